"""clex: CLEX (Continuous Length EXtrapolation) and the standard RoPE scaling baselines for transformers.

Public API::

    clex.apply(model, "clex", max_factor=16)      # or "yarn:factor=8", "pi", "ntk", "dynamic", …
    clex.from_pretrained(path)                     # clex, reference-CLEX or plain checkpoints
    clex.generate(model, ids, policy="rerotate")   # generation with a KV cache kept right as t changes
    clex.available_methods()
    clex.sample_training_positions(L, max_factor, generator)   # a CLEX training step's (t', position_ids)
"""

from .cache import generate
from .methods import available_methods
from .models import ModelLoadError, UnsupportedModelError, apply, clex_modules, from_pretrained
from .rotary import CLEXConfig, extrapolated_positions, sample_scale_factor, sample_training_positions

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
    "sample_scale_factor",
    "sample_training_positions",
]
__version__ = "0.1.0"
