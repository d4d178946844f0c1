"""clex: CLEX (Continuous Length EXtrapolation) and the standard RoPE scaling baselines for transformers.

Public API::

    clex.apply(model, "clex", max_factor=16)           # or "yarn:factor=8", "pi:factor=4", "ntk:factor=4", …
    clex.from_pretrained(path)                          # clex, reference-CLEX or plain checkpoints
    clex.generate(model, ids, cache_mode="rerotate")    # generation with a KV cache kept right as t changes
    clex.available_methods()
    clex.sample_training_positions(L, max_factor, generator)   # a CLEX training step's (t', position_ids)
    clex.unfreeze_clex(peft_model)                      # CLEX trainable again after peft's get_peft_model
    clex.restore_clex(peft_model, adapter_dir)          # CLEX back on a model peft's own loaders built

The package is laid out in layers (the README's module map; tests/test_layout.py checks the direction): the core
modules at the top level, then ``io`` and ``data``, then ``training``, ``eval`` and ``serve``, then ``cli``.
"""

from clex import _moved, hooks  # noqa: F401  (installs the transformers hooks: rope types, CLEX at model init)
from clex.adapters import restore_clex, unfreeze_clex
from clex.generation import generate
from clex.layouts import UnsupportedModelError
from clex.loading import ModelLoadError, from_pretrained
from clex.methods import available_methods
from clex.models import apply
from clex.positions import extrapolated_positions, sample_scale_factor, sample_training_positions
from clex.rotary import CLEXConfig, clex_modules

__all__ = [
    "CLEXConfig",
    "ModelLoadError",
    "UnsupportedModelError",
    "apply",
    "available_methods",
    "clex_modules",
    "extrapolated_positions",
    "from_pretrained",
    "generate",
    "restore_clex",
    "sample_scale_factor",
    "sample_training_positions",
    "unfreeze_clex",
]
__version__ = "0.1.0"
_moved.install()
