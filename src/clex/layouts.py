"""What a family's rotary module can carry, checked before ``apply`` commits: a method is applied and right, or
refused in one line — never accepted and wrong, never a crash at the first forward.

Each check reads the module or config itself (a probe of four positions, a round trip of the config), so a new
family is judged by what it does, not by a list; the one list, :data:`LOCAL_ROPE_ONLY`, names families whose
attention code skips the rotary embedding on their global layers, which no module or config shows.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from clex.errors import UnsupportedModel

UnsupportedModelError = UnsupportedModel  # the older name


# Families whose rope reaches only sliding-window layers (global layers use no position encoding, decided in
# their attention code): scaling it extends nothing, since a window does not grow with the context.
LOCAL_ROPE_ONLY = ("flint",)
# Methods whose frequencies divide by d − 2 (NTK's base · factor^(d/(d−2)); CLEX's untrained path is NTK).
NEEDS_WIDE_ROTARY = ("ntk", "dynamic", "clex")


def probe(module: nn.Module, layer_type: str | None = None):
    """The module's output on four positions (``(cos, sin)`` for the usual layout)."""
    module = getattr(module, "original", module)
    buffer = next(iter(module.buffers()), None)
    device = buffer.device if buffer is not None else "cpu"
    args = (layer_type,) if "layer_type" in inspect.signature(module.forward).parameters and layer_type else ()
    with torch.no_grad():
        return module(torch.zeros(1, device=device), torch.arange(4, device=device)[None], *args)


def rotary_layout(module: nn.Module, layer_type: str | None = None) -> str:
    """How a rotary module lays out its cos/sin over the head dimension, probed on four positions:
    ``"half"`` (pairs (i, i + d/2), as CLEX builds them), ``"interleaved"`` (pairs (2i, 2i + 1): Cohere) or
    ``"other"`` (one value per pair: GPT-OSS; complex numbers: Llama 4). A module whose forward cannot be
    probed so reads as ``"half"``; the check of the rebuilt modules (:func:`check_rebuilt`) catches it."""
    try:
        out = probe(module, layer_type)
    except Exception:  # noqa: BLE001 - a probe only
        return "half"
    if not (isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0])) or out[0].is_complex():
        return "other"
    cos = out[0].float().reshape(-1, out[0].shape[-1])
    d = cos.shape[-1]
    if d % 2 == 0 and torch.equal(cos[:, : d // 2], cos[:, d // 2 :]):
        return "half"
    if d % 2 == 0 and torch.equal(cos[:, 0::2], cos[:, 1::2]):
        return "interleaved"
    return "other"


def check_family(config, method: str, rotary_dim: int, rope: dict) -> None:
    """Refuse what the family's code or width rules out, before anything is built."""
    if "llama_4_scaling_beta" in rope:
        raise UnsupportedModelError(f"model type {config.model_type!r} scales its queries by position over its rope's "
                                    "original_max_position_embeddings (llama_4_scaling_beta), a schedule a "
                                    "length method would change; clex supports only 'vanilla' on it")
    if config.model_type in LOCAL_ROPE_ONLY:
        raise UnsupportedModelError(f"model type {config.model_type!r} rotates only its sliding-window layers (its "
                                    "global layers use no position encoding), so a length method has nothing to "
                                    "scale")
    if method in NEEDS_WIDE_ROTARY and rotary_dim <= 2:
        raise UnsupportedModelError(f"method {method!r} needs a rotary width above 2 (NTK scales the base by "
                                    f"factor^(d/(d−2))); model type {config.model_type!r} rotates {rotary_dim} "
                                    "dims per head")


def build_rotary(cls, config, device, method: str):
    """``cls(config)`` on ``device``, probed once: a family whose module cannot run with the method's parameters
    is refused here, not at the first forward."""
    try:
        module = cls(config).to(device)
        for layer_type in getattr(module, "layer_types", None) or [None]:
            if layer_type is None or f"{layer_type}_inv_freq" in module._buffers:
                probe(module, layer_type)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError, RuntimeError) as err:
        raise UnsupportedModelError(f"method {method!r} on model type {config.model_type!r}: its rotary module "
                                    f"cannot run with the method's parameters ({type(err).__name__}: "
                                    f"{' '.join(str(err).split())[:160]})") from None
    return module


def check_round_trip(config, method: str) -> None:
    """A checkpoint written with the new config must load back: refuse a method its family's config rewrites on
    load (Phi-3 reads ``yarn`` as ``longrope``)."""
    try:
        type(config).from_dict(config.to_dict()).validate_rope()
    except (KeyError, ValueError, TypeError) as err:
        raise UnsupportedModelError(f"method {method!r} on model type {config.model_type!r}: a checkpoint saved with "
                                    f"it would not load back ({' '.join(str(err).split())[:160]}); choose another "
                                    "method") from None
