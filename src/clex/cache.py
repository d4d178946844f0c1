"""The KV-cache modes: keep a CLEX model's cache right when t changes (docs/design.md §7).

Keys in the cache were rotated with θ(t) of the step that wrote them. When t changes, every cached
key at position m is rotated once more by ``m·(θ(t') − θ(t))`` — rotations compose — so the cache
equals keys rotated with the new frequencies: the reference's semantics (it re-rotates un-rotated
keys at every step) at O(changes of t) instead of O(steps).

A forward pre-hook on the decoder (installed with every CLEX module) does it before the step whose
t differs from the cache's. Each row of a batch has its own t (``CLEXRotary.token_factors``): the hook
records the attention mask of the step's tokens for the rotary module, keeps one t per row in the cache,
and rotates the keys of the rows whose t changed (the others stay exactly as they are).
Cache modes (``CLEXRotary.cache_mode``):

* ``rerotate`` (default, also for plain ``model.generate``): re-rotate the cached keys in place;
* ``recompute``: re-run the prefill over the whole sequence so far at the new t (``clex.generate``
  only: it needs the token ids, which it records at each step);
* ``frozen``: t fixed for the whole generation from prompt length + max_new_tokens (each row's own);
* ``off``: stock transformers behaviour (cached keys keep their old frequencies; warns once).
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import nn

from clex.rotary import CLEXRotary

CACHE_MODES = ("rerotate", "recompute", "frozen", "off")


def install_cache_hook(decoder: nn.Module, attr: str) -> None:
    """Register the re-rotation pre-hook on ``decoder``, whose child ``attr`` is the CLEX module.

    The hook finds the module by name at call time, so deep copies of the model stay correct.
    """
    for handle_id, hook in list(decoder._forward_pre_hooks.items()):
        if isinstance(hook, functools.partial) and hook.func is _cache_hook:
            del decoder._forward_pre_hooks[handle_id]
            decoder._forward_pre_hooks_with_kwargs.pop(handle_id, None)
    decoder.register_forward_pre_hook(functools.partial(_cache_hook, attr), with_kwargs=True)


def _warn_gaps(rot: CLEXRotary, decoder: nn.Module, kwargs) -> None:
    """Once per model: gapped ``position_ids`` without an attention mask or a KV cache (a training forward),
    which transformers reads as packed sequences (attention blocked at every gap), so the logits are not
    those of one sequence."""
    position_ids = kwargs.get("position_ids")
    if "gaps" in rot._decode_warned or kwargs.get("attention_mask") is not None or position_ids is None or \
            position_ids.shape[-1] < 2:
        return
    use_cache = kwargs.get("use_cache")
    use_cache = getattr(getattr(decoder, "config", None), "use_cache", False) if use_cache is None else use_cache
    if decoder.training and getattr(decoder, "gradient_checkpointing", False):
        use_cache = False  # transformers turns the cache off there, after this hook
    if kwargs.get("cache", kwargs.get("past_key_values")) is not None or use_cache:
        return  # with a cache transformers does not look for packed sequences
    if bool((torch.diff(position_ids, dim=-1) > 1).any()):
        rot._decode_warned.add("gaps")
        warnings.warn("position_ids have gaps and no attention_mask was given: transformers reads each gap as the "
                      "start of another packed sequence and blocks attention across it; pass "
                      "attention_mask=torch.ones_like(input_ids) to attend over the whole sequence", stacklevel=3)


def _cache_hook(attr: str, decoder: nn.Module, args, kwargs):
    rot = getattr(decoder, attr, None)
    if not isinstance(rot, CLEXRotary):
        return None
    _warn_gaps(rot, decoder, kwargs)
    rot._attend = _current_mask(kwargs, args)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 names it `cache`
    if cache is None or rot._in_recompute:
        return None
    positions = _step_positions(kwargs, args, cache)
    if positions is None:
        return None
    t_new = row_factors(rot, positions)
    t_old = getattr(cache, "_clex_t", None)
    cache._clex_t = t_new
    if t_old is None or cache.get_seq_length() == 0:
        return None
    t_old, t_new = torch.broadcast_tensors(torch.as_tensor(t_old, dtype=torch.float64), t_new)
    if torch.equal(t_old, t_new):
        return None
    if rot.cache_mode == "rerotate":
        rerotate(rot, decoder, cache, t_old, t_new, kwargs.get("attention_mask"))
    elif rot.cache_mode == "recompute":
        _recompute(rot, decoder, cache, t_new, kwargs.get("attention_mask"))
    elif rot.cache_mode == "off" and "t" not in rot._decode_warned:
        rot._decode_warned.add("t")
        warnings.warn(
            f"CLEX's t changed from {float(t_old.max()):g} to {float(t_new.max()):g} while decoding with a KV cache "
            "and cache mode 'off': keys cached earlier keep the old frequencies, as stock transformers does for "
            "dynamic rope",
            stacklevel=2,
        )
    return None


def _current_mask(kwargs, args) -> torch.Tensor | None:
    """The 2-D attention mask of this forward's own tokens (its last columns), or None."""
    mask = kwargs.get("attention_mask")
    q = _step_length(kwargs, args)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or q is None or mask.shape[1] < q:
        return None
    return mask[:, -q:]


def row_factors(rot: CLEXRotary, positions: torch.Tensor) -> torch.Tensor:
    """Each row's t for this step (float64, one per row): the largest t among its tokens (0, a LongRoPE base's
    short set, counts as 1)."""
    keys, _ = rot.token_factors(positions)
    if isinstance(keys, float):
        rows = positions.shape[0] if rot._attend is None else rot._attend.shape[0]
        return torch.full((rows,), max(keys, 1.0), dtype=torch.float64)
    return keys.clamp(min=1.0).amax(-1).double().cpu()


def cache_kwarg(module: nn.Module) -> str:
    """The name ``module.forward`` takes its KV cache by: ``cache`` from transformers 5.24 on (the
    old ``past_key_values`` still works there, deprecated), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _step_positions(kwargs, args, cache) -> torch.Tensor | None:
    """Position ids of the tokens of this forward, as the model will compute them."""
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids
    q = _step_length(kwargs, args)
    if q is None:
        return None
    past = cache.get_seq_length()
    return torch.arange(past, past + q)[None]


def _step_length(kwargs, args) -> int | None:
    """How many tokens this forward feeds (from its ids or embeddings), or None."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    embeds = kwargs.get("inputs_embeds")
    return ids.shape[1] if ids is not None else embeds.shape[1] if embeds is not None else None


def _slot_positions(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Position of each of the first ``length`` sequence slots, per row: from the attention mask as
    ``generate`` computes position ids (left padding: pads sit at position 1), else 0 … length − 1."""
    if attention_mask is None:
        return torch.arange(length, device=device)[None].expand(batch, -1)
    mask = _mask_2d(attention_mask)[:, :length].to(device)
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _mask_2d(attention_mask: torch.Tensor) -> torch.Tensor:
    """A [B, kv] mask of 0/1: static caches get a prepared [B, 1, q, kv] mask, read from its last query row."""
    if attention_mask.dim() == 4:
        last = attention_mask[:, 0, -1, :]
        return ((last == 0) if last.is_floating_point() else last.bool()).long()
    return attention_mask


def _clex_layers(decoder: nn.Module, rot: CLEXRotary, n_layers: int) -> list[int]:
    """Indices of the layers whose keys CLEX rotates (Gemma 3: the global ones only)."""
    layer_types = getattr(decoder.config, "layer_types", None)
    if rot.layer_type is None or not layer_types:
        return list(range(n_layers))
    return [i for i in range(n_layers) if layer_types[i] == rot.layer_type]


@torch.no_grad()
def rerotate(rot: CLEXRotary, decoder: nn.Module, cache, t_old, t_new, attention_mask=None) -> None:
    """Rotate every cached key of the CLEX layers from θ(t_old) to θ(t_new), in place: one t per row (tensors of
    the batch size) or one for all (floats). A row whose t did not change is left exactly as it is."""
    theta_old, theta_new = _row_thetas(rot, t_old), _row_thetas(rot, t_new)
    half = theta_old.shape[-1]
    for i in _clex_layers(decoder, rot, len(cache.layers)):
        layer = cache.layers[i]
        keys = getattr(layer, "keys", None)
        if keys is None or not getattr(layer, "is_initialized", True) or keys.numel() == 0:
            continue
        start, stop, slot = _slots(layer)
        if stop <= start:
            continue
        batch = keys.shape[0]
        seq_positions = _slot_positions(attention_mask, batch, stop, keys.device)[:, start:stop].float()
        new, old = theta_new.to(keys.device)[:, None], theta_old.to(keys.device)[:, None]  # [B or 1, 1, d/2]
        # the angles exactly as the rotary module computes them (fp32 products), differenced in fp64
        delta = (seq_positions[..., None] * new).double() - (seq_positions[..., None] * old).double()
        cos, sin = torch.cos(delta), torch.sin(delta)  # [B, S, d/2]
        k = keys[:, :, slot, : 2 * half].double()
        k1, k2 = k[..., :half], k[..., half:]
        c, s = cos[:, None], sin[:, None]
        rotated = torch.cat((k1 * c - k2 * s, k2 * c + k1 * s), dim=-1)
        keys[:, :, slot, : 2 * half] = rotated.to(keys.dtype)


def _row_thetas(rot: CLEXRotary, t) -> torch.Tensor:
    """θ(t) per row ([rows, d/2]) for a tensor of t per row, or [1, d/2] for one t."""
    if not torch.is_tensor(t) or t.dim() == 0:
        return rot.frequencies(float(t))[None]
    return torch.stack([rot.frequencies(float(v)) for v in t.tolist()])


def _slots(layer) -> tuple[int, int, slice]:
    """The sequence indices [start, stop) a cache layer holds, and where they sit in its tensors."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer

    if isinstance(layer, DynamicSlidingWindowLayer):  # the last keys.shape[-2] tokens
        stop = int(layer.cumulative_length)
        held = layer.keys.shape[-2]
        return stop - held, stop, slice(0, held)
    if isinstance(layer, DynamicLayer):
        stop = layer.keys.shape[-2]
        return 0, stop, slice(0, stop)
    if isinstance(layer, StaticLayer) and not getattr(layer, "is_sliding", False):
        stop = int(layer.get_seq_length())
        return 0, stop, slice(0, stop)
    raise NotImplementedError(f"clex cannot re-rotate a {type(layer).__name__} cache layer")


@torch.no_grad()
def _recompute(rot: CLEXRotary, decoder: nn.Module, cache, t_new: float, attention_mask=None) -> None:
    """Re-run the decoder over the sequence so far at t_new and replace the cache's contents."""
    from transformers import DynamicCache

    prefix = rot._recorded_ids
    past = cache.get_seq_length()
    if prefix is None or prefix.shape[1] != past:
        raise RuntimeError("cache mode 'recompute' needs clex.generate(..., cache_mode='recompute')")
    mask = _mask_2d(attention_mask)[:, :past] if attention_mask is not None else None
    positions = _slot_positions(mask, prefix.shape[0], past, prefix.device)
    fresh = DynamicCache(config=decoder.config)
    saved = rot.t_override
    rot._in_recompute, rot.t_override = True, t_new
    try:
        decoder(input_ids=prefix, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_kwarg(decoder): fresh})
    finally:
        rot._in_recompute, rot.t_override = False, saved
    for old, new in zip(cache.layers, fresh.layers, strict=True):
        _, _, dst = _slots(old)
        _, _, src = _slots(new)
        old.keys[:, :, dst] = new.keys[:, :, src]
        old.values[:, :, dst] = new.values[:, :, src]
