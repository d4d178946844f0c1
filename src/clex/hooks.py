"""The hooks installed into transformers when clex is imported (once, idempotently; docs/design.md §9).

They register the ``clex`` and ``ntk`` rope types, give any model whose config says ``rope_type = "clex"``
its CLEX module at construction (so ``AutoModelForCausalLM.from_pretrained`` loads CLEX weights like any
other weight), initialise missing CLEX weights as the reference does, keep them in fp32, and force
non-reentrant gradient checkpointing on CLEX models.
"""

from __future__ import annotations

import functools

from transformers import PreTrainedModel

from clex.cache import install_cache_hook
from clex.composed import install as install_composition
from clex.dynamics import CLEXDynamics
from clex.layouts import UnsupportedModelError
from clex.methods import register_with_transformers
from clex.models import clex_settings, rope_layer_type, rotary_modules, text_config, wrap_rotary
from clex.rotary import CLEXRotary, clex_modules


# --- construction hook: configs that say "clex" get their module at model init ----------------------
def _install_from_config(model: PreTrainedModel) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "rope_parameters"):
        return
    try:
        config = text_config(model)
        layer_type = rope_layer_type(config)
    except (UnsupportedModelError, AttributeError, TypeError):
        return
    rope = (config.rope_parameters or {}).get(layer_type) if layer_type else config.rope_parameters
    if not rope or rope.get("rope_type", rope.get("type")) != "clex":
        return
    clex_config = clex_settings(rope, config, config.max_position_embeddings)
    rope.pop("policy", None)  # the older name of t_rule
    rope.update(clex_config.to_rope_parameters())  # saved configs carry every setting, defaults included
    for parent, attr, module in rotary_modules(model):
        if not isinstance(module, CLEXRotary):
            setattr(parent, attr, wrap_rotary(module, clex_config, layer_type))
            install_cache_hook(parent, attr)


def _patch_transformers() -> None:
    """Hooks installed once on import (idempotent)."""
    register_with_transformers()
    install_composition()
    if getattr(PreTrainedModel, "_clex_patched", False):
        return
    original_post_init = PreTrainedModel.post_init
    original_init_weights = PreTrainedModel._init_weights
    original_checkpointing = PreTrainedModel._activation_checkpointing_enable

    @functools.wraps(original_post_init)
    def post_init(self, *args, **kwargs):
        _install_from_config(self)
        result = original_post_init(self, *args, **kwargs)
        if clex_modules(self):  # load CLEX weights in fp32 even when the model loads in bf16/fp16
            self._keep_in_fp32_modules_strict = {*(self._keep_in_fp32_modules_strict or ()), "clex_ode"}
        return result

    @functools.wraps(original_init_weights)
    def _init_weights(self, module):
        if isinstance(module, CLEXDynamics):  # CLEX weights missing from a checkpoint: the reference init
            module.reset_parameters()
            return
        return original_init_weights(self, module)

    @functools.wraps(original_checkpointing)
    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        # Reentrant checkpointing drops gradients of inputs passed by keyword (the cos/sin that carry
        # CLEX's gradients) and breaks with peft: force the non-reentrant variant on CLEX models.
        if clex_modules(self):
            activation_checkpointing_kwargs = {**(activation_checkpointing_kwargs or {}), "use_reentrant": False}
        return original_checkpointing(self, activation_checkpointing_kwargs, *args, **kwargs)

    _accept_registered_rope_types()
    PreTrainedModel.post_init = post_init
    PreTrainedModel._init_weights = _init_weights
    PreTrainedModel._activation_checkpointing_enable = _activation_checkpointing_enable
    PreTrainedModel._clex_patched = True


def _accept_registered_rope_types() -> None:
    """Phi-3-style configs refuse every rope type but their own; let them take any registered one."""
    from transformers import Phi3Config, PhimoeConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RotaryEmbeddingConfigMixin

    for cls in (Phi3Config, PhimoeConfig):
        own = cls.validate_rope

        def validate_rope(self, _own=own):
            rope_type = (self.rope_parameters or {}).get("rope_type")
            if rope_type in ROPE_INIT_FUNCTIONS and rope_type != "longrope":
                return RotaryEmbeddingConfigMixin.validate_rope(self)
            return _own(self)

        cls.validate_rope = validate_rope
        # configs are strict dataclasses that also keep their validators in a list
        validators = getattr(cls, "__class_validators__", None)
        if validators is not None:
            validators[:] = [validate_rope if v is own else v for v in validators]


_patch_transformers()
