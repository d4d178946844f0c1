"""LoRA runs: where a run's adapter finds its base model, and CLEX around peft.

``clex train --lora`` saves peft's adapter plus the run's method (``clex_method.json``) and CLEX matrices
(``clex_ode.safetensors``) beside it, since an adapter holds only LoRA weights. peft's
``get_peft_model`` freezes CLEX with the rest of the base model, and peft's own loaders rebuild the base
without CLEX: :func:`unfreeze_clex` and :func:`restore_clex` are the clex calls for those two moments.
"""

from __future__ import annotations

import os

from torch import nn

from clex.errors import describe
from clex.loading import (
    ModelLoadError,
    ModelNotFoundError,
    _json_file,
    _set_clex_weights,
    from_pretrained,
    is_local_path,
)
from clex.models import PreTrainedModel, apply
from clex.rotary import clex_modules

ADAPTER_METHOD_FILE, ADAPTER_CLEX_FILE = "clex_method.json", "clex_ode.safetensors"  # beside a LoRA adapter


def adapter_base(path) -> str:
    """The base model of the LoRA adapter in ``path``, as its ``adapter_config.json`` records it: an absolute
    path, a path relative to the adapter or to the working directory, or a hub name."""
    adapter_file = os.path.join(path, "adapter_config.json")
    base = _json_file(adapter_file).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{adapter_file} names no base model (the adapter was trained on a model built in "
                             "memory): load that model yourself, attach the adapter with peft's "
                             "PeftModel.from_pretrained(model, adapter_dir), then call clex.restore_clex")
    base = os.path.expanduser(base)
    for candidate in ((base,) if os.path.isabs(base) else (os.path.join(path, base), base)):
        if os.path.isdir(candidate):
            return candidate
    if is_local_path(base):
        raise ModelNotFoundError(f"{adapter_file} names the base model {base}, which is not there; put it back or "
                                 "edit base_model_name_or_path")
    return base  # a hub name


def _adapter_method(path) -> dict | None:
    method_file = os.path.join(path, ADAPTER_METHOD_FILE)
    if not os.path.exists(method_file):
        return None
    record = _json_file(method_file)
    if not isinstance(record.get("method"), str) or not isinstance(record.get("rope_parameters"), dict | None):
        raise ModelLoadError(f"{method_file} does not name a method and its rope parameters")
    return record


def unfreeze_clex(model: nn.Module, trainable: bool = True) -> nn.Module:
    """Make the CLEX matrices trainable (or not): peft's ``get_peft_model`` freezes every parameter but its
    adapters, CLEX's included, so a training loop of one's own calls this after it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers or peft model (a torch.nn.Module), got {describe(model)}")
    for module in clex_modules(model):
        module.clex_ode.requires_grad_(trainable)
    return model


def restore_clex(model: nn.Module, adapter_dir) -> nn.Module:
    """Give a model loaded through peft's own loaders (``AutoPeftModelForCausalLM``, ``PeftModel``), which
    rebuild the base model without CLEX, the run's method and CLEX weights saved beside the adapter."""
    from safetensors.torch import load_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers or peft model (a torch.nn.Module), got {describe(model)}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    record = _adapter_method(adapter_dir)
    if record is None:
        return model  # a plain LoRA run: nothing of clex's to restore
    rope = record.get("rope_parameters")
    skip = ("rope_type", "rope_theta", "partial_rotary_factor", "scaled_from")  # the base as shipped gives the last
    params = {k: v for k, v in (rope or {}).items() if k not in skip}
    apply(base, record["method"].partition(":")[0] if rope else record["method"], **params)
    weights_file = os.path.join(adapter_dir, ADAPTER_CLEX_FILE)
    if rope and os.path.exists(weights_file):
        weights = load_file(weights_file)
        _set_clex_weights(base, weights["up_proj"], weights["down_proj"])
    return model


def from_adapter(path, **kwargs) -> PreTrainedModel:
    """A LoRA run saved by ``clex train`` without `merge`: the base model with the run's method and
    CLEX weights, the adapter merged in."""
    from peft import PeftModel

    model = restore_clex(from_pretrained(adapter_base(path), **kwargs), path)
    return PeftModel.from_pretrained(model, path).merge_and_unload()
