"""Methods on an already-scaled model (docs/design.md §8): the rope a model ships with is kept, and every
method composes with it.

Most models people extend ship a scaled rope (Llama 3.x ``llama3``, Qwen with ``yarn``, Gemma 3 ``linear`` on
its global layers, Phi-3 long ``longrope``). A method starts from the frequencies such a model actually uses,
θ_b, and from its current context L, never from the raw θ beneath them:

* every stock method is a per-pair rescaling of the raw θ, ``θ_m = θ · m``; on a scaled model it becomes
  ``θ_b · m`` (PI: θ_b / factor; NTK: θ_b · α^(−2j/d); YaRN and Llama 3's ramps with their bands placed as for
  the raw θ), with the cos/sin scales multiplied;
* CLEX's ODE starts from log θ_b, so untrained CLEX at t = 1 is the model as shipped;
* ``vanilla`` is the model as shipped.

The shipped rope is kept in the new rope parameters under ``scaled_from`` (with the shipped
``max_position_embeddings``), so a saved model reloads exactly after ``import clex``; transformers' rope-init
table is wrapped once so that every rotary module built from such a config computes ``θ_b · m``.

``longrope`` switches between two factor sets at its original length L0: the composed methods use the long set
(the frequencies at the model's full context); CLEX at t = 1 keeps the switch (``CLEXRotary`` asks
:func:`base_frequencies` for the short set below L0). ``dynamic`` is the plain θ inside its context, so methods
start from θ there. Any other rope type cannot be composed with, and is refused in one line.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from transformers import modeling_rope_utils as mru

from clex.errors import UnsupportedModel
from clex.methods import _rope_dims, plain_inv_freq

SCALED_FROM = "scaled_from"  # the key under which a method's rope parameters keep the shipped rope
SHIPPED_LENGTH = "max_position_embeddings"  # inside SCALED_FROM: the shipped config's max_position_embeddings
COMPOSABLE = ("linear", "ntk", "yarn", "llama3", "longrope")  # static per-pair rescalings of θ
PLAIN = ("default", "dynamic")  # the raw θ inside the model's context


def context_length(rope: dict, max_position_embeddings: int) -> int:
    """The context a rope serves: ``max_position_embeddings``, or factor × original length where the rope says
    more (Qwen's ``yarn`` block leaves ``max_position_embeddings`` at the original 32k)."""
    factor, original = rope.get("factor"), rope.get("original_max_position_embeddings")
    if rope.get("rope_type") in ("yarn", "llama3", "longrope") and factor and original:
        return max(int(max_position_embeddings), int(math.ceil(factor * original)))
    return int(max_position_embeddings)


def shipped(rope: dict, max_position_embeddings: int) -> tuple[dict, int]:
    """``(rope, max_position_embeddings)`` of the model as shipped, from its current rope parameters: what a
    method clex wrote keeps under ``scaled_from``, plain RoPE at the CLEX length for a CLEX model without one,
    else the rope as it is."""
    if SCALED_FROM in rope:
        base = copy.deepcopy(rope[SCALED_FROM])
        return base, int(base.pop(SHIPPED_LENGTH))
    if rope.get("rope_type") == "clex":
        plain = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
        if "partial_rotary_factor" in rope:
            plain["partial_rotary_factor"] = rope["partial_rotary_factor"]
        return plain, int(rope["original_max_position_embeddings"])
    return copy.deepcopy(rope), int(max_position_embeddings)


def compose(rope: dict, base: dict, shipped_length: int, model_type: str) -> dict:
    """``rope`` (a method's parameters on the raw θ) on top of the shipped ``base``: ``rope`` with
    ``scaled_from`` added where the base is scaled; refused in one line where composing is not defined."""
    kind = base.get("rope_type", "default")
    if kind in PLAIN:
        return rope
    if kind not in COMPOSABLE:
        raise UnsupportedModel(f"model type {model_type!r} ships rope type {kind!r}, which clex cannot compose "
                               f"methods with (it composes with {', '.join(COMPOSABLE)}); only 'vanilla' keeps "
                               "it")
    if kind == "longrope" and rope["rope_type"] == "dynamic":
        raise UnsupportedModel(f"method 'dynamic' on model type {model_type!r}: its 'longrope' switches factor "
                               "sets at its original length, which dynamic NTK cannot keep; use clex or a "
                               "fixed-factor method")
    base = copy.deepcopy(base)
    if kind == "longrope" and not base.get("factor"):  # what transformers derives from the shipped lengths
        base["factor"] = shipped_length / base["original_max_position_embeddings"]
    base.pop(SCALED_FROM, None)
    return {**rope, SCALED_FROM: {**base, SHIPPED_LENGTH: int(shipped_length)}}


def base_frequencies(config, layer_type: str | None, device=None, short: bool = False) -> tuple[torch.Tensor, float]:
    """θ_b and its cos/sin scale from the ``scaled_from`` of ``config``'s rope parameters (``short``: a
    ``longrope`` base's short set, used below its original length; else the long set)."""
    params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
    base = copy.deepcopy(params[SCALED_FROM])
    length = base.pop(SHIPPED_LENGTH)
    view = copy.copy(config)  # a shallow view: the real config is not touched
    view.rope_parameters = {**config.rope_parameters, layer_type: base} if layer_type is not None else base
    view.max_position_embeddings = length
    if "original_max_position_embeddings" in base and hasattr(config, "original_max_position_embeddings"):
        view.original_max_position_embeddings = base["original_max_position_embeddings"]  # Phi-3 reads it first
    seq_len = None
    if base["rope_type"] == "longrope" and not short:
        seq_len = base["original_max_position_embeddings"] + 1
    return mru.ROPE_INIT_FUNCTIONS[base["rope_type"]](view, device, seq_len=seq_len, layer_type=layer_type)


def _composing(fn):
    """``fn`` (a rope-init function on the raw θ) made to return θ_b · (θ_fn / θ) where the config's rope
    parameters carry ``scaled_from``; unchanged otherwise."""

    @functools.wraps(fn)
    def init(config, device=None, seq_len=None, layer_type=None, **kwargs):
        inv_freq, scale = fn(config, device, seq_len=seq_len, layer_type=layer_type, **kwargs)
        params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
        if not params or SCALED_FROM not in params:
            return inv_freq, scale
        _, theta, dim = _rope_dims(config, layer_type)
        raw = plain_inv_freq(theta, dim, inv_freq.device)
        base, base_scale = base_frequencies(config, layer_type, inv_freq.device)
        return base.to(inv_freq.dtype) * (inv_freq / raw), float(base_scale) * float(scale)

    init._clex_composing = True
    return init


def install() -> None:
    """Wrap every rope-init function transformers knows (and clex registered) once, so modules built from a
    config with ``scaled_from`` compute the composed frequencies (idempotent)."""
    table = mru.ROPE_INIT_FUNCTIONS
    for name, fn in list(table.items()):
        if not getattr(fn, "_clex_composing", False):
            table[name] = _composing(fn)
    check = mru.RotaryEmbeddingConfigMixin._check_received_keys
    if not getattr(check, "_clex_composing", False):

        def _check_received_keys(rope_type, received_keys, *args, **kwargs):
            return check(rope_type, set(received_keys) - {SCALED_FROM}, *args, **kwargs)

        _check_received_keys._clex_composing = True
        mru.RotaryEmbeddingConfigMixin._check_received_keys = staticmethod(_check_received_keys)
