"""``clex.generate``: ``model.generate`` with the KV cache kept right as CLEX's t changes.

The cache mode (``rerotate``, ``recompute``, ``frozen``, ``off``; see ``clex.cache``) is set on every CLEX
module for the call and restored after it; ``frozen`` fixes each row's t from its prompt and
``max_new_tokens``. Also the ids that end a generation (``eos_ids``, ``until_eos``).
"""

from __future__ import annotations

import torch
from torch import nn

from clex.cache import CACHE_MODES
from clex.errors import NonFiniteLogits
from clex.rotary import CLEXRotary, clex_modules


def refuse_nan(input_ids, scores):
    """A logits processor for ``generate``: NaN logits stop generation with ``NonFiniteLogits`` (their argmax
    or sample would be garbage, not a wrong answer)."""
    if torch.isnan(scores).any():
        raise NonFiniteLogits("the model's logits are NaN (broken weights, or fp16 overflow)")
    return scores


def eos_ids(model, tokenizer) -> list[int]:
    """The ids that end a generation: the model's generation config's, else the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return []
    return [int(x) for x in (ids if isinstance(ids, (list, tuple)) else [ids])]


def pad_id(tokenizer, model=None) -> int:
    """The one id that pads: the tokenizer's pad token, else the first end-of-sequence id, else 0. Padding is
    masked out of attention and loss, and a finished row is cut at its end-of-sequence id, so the choice never
    reaches a score or an answer; it only has to be a valid id."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        eos = eos_ids(model, tokenizer)
        pad = eos[0] if eos else 0
    return int(pad)


def until_eos(row: list[int], eos: list[int]) -> list[int]:
    """``row`` up to (not including) its first end-of-sequence id."""
    for j, tok in enumerate(row):
        if tok in eos:
            return row[:j]
    return row


def frozen_factors(rot: CLEXRotary, input_ids: torch.Tensor, attention_mask, max_new: int):
    """The ``frozen`` mode's t: each row's from its own prompt length (its attended tokens) + max_new_tokens;
    one float when every row gets the same."""
    if isinstance(attention_mask, torch.Tensor):
        lengths = attention_mask.to(torch.long).sum(-1).tolist()
    else:
        lengths = [input_ids.shape[1]] * input_ids.shape[0]
    factors = [rot.scaling_factor(int(n) + max_new) for n in lengths]
    return factors[0] if len(set(factors)) == 1 else torch.tensor(factors, dtype=torch.float64)


class _RecordIds:
    """A logits processor that only records the sequence so far (for the recompute mode)."""

    def __init__(self, modules: list[CLEXRotary]):
        self.modules = modules

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for m in self.modules:
            m._recorded_ids = input_ids
        return scores


def _vocab_size(model) -> int | None:
    """How many token ids the model's input embedding has (None when it cannot tell)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, TypeError, NotImplementedError):
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "vocab_size", None)


def check_generate_args(model, input_ids, cache_mode: str, kwargs: dict) -> torch.Tensor:
    """Refuse what ``model.generate`` would answer with an indexing or shape error deep inside the model, in
    ``clex.generate``'s words; returns ``input_ids`` as int64. One row is ``input_ids[None]``: a 1-D tensor is
    refused, so the result always has the shape of the input plus the new tokens."""
    from clex.errors import check_number, describe

    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(f"model must be a transformers causal LM (a torch.nn.Module with .generate), "
                        f"got {describe(model)}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids of shape [batch, length], got "
                        f"{describe(input_ids)}")
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        hint = " (one sequence: input_ids[None])" if input_ids.dim() == 1 else ""
        raise ValueError(f"input_ids must be 2-D [batch, length], got shape {list(input_ids.shape)}{hint}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}); give at least one token per row")
    vocab = _vocab_size(model)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        where = f"the model's vocabulary of {vocab} ids (0 … {vocab - 1})" if vocab else "the vocabulary"
        raise ValueError(f"input_ids holds token id {low if low < 0 else high}, outside {where}")
    if not isinstance(cache_mode, str) or cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(input_ids.shape)}: "
                         "they must match")
    if kwargs.get("max_new_tokens") is not None:
        check_number("max_new_tokens", kwargs["max_new_tokens"], lambda x: x >= 1, "an integer >= 1", integer=True)
    if kwargs.get("temperature") is not None:
        check_number("temperature", kwargs["temperature"], lambda x: x >= 0, "0 (greedy) or a finite positive number")
        sampling = kwargs.get("do_sample", getattr(getattr(model, "generation_config", None), "do_sample", False))
        if kwargs["temperature"] == 0 and sampling:
            raise ValueError("temperature must be above 0 when sampling (do_sample=True); for greedy decoding pass "
                             "do_sample=False")
    if kwargs.get("top_p") is not None:
        check_number("top_p", kwargs["top_p"], lambda x: 0 < x <= 1, "a number in (0, 1]")
    if kwargs.get("top_k") is not None:
        check_number("top_k", kwargs["top_k"], lambda x: x >= 0, "an integer >= 0", integer=True)
    return input_ids if input_ids.dtype == torch.long else input_ids.long()


def generate(model, input_ids: torch.Tensor, cache_mode: str = "rerotate", *, policy: str | None = None,
             **generate_kwargs):
    """``model.generate`` for a CLEX model with a cache mode (``clex.cache``; ``policy`` is its older name).

    ``input_ids`` is a [batch, length] tensor of ids in the model's vocabulary (checked first, with one clear
    error). Returns what ``model.generate`` returns. Models without CLEX generate as usual.
    """
    from transformers import LogitsProcessorList

    cache_mode = policy if policy is not None else cache_mode
    input_ids = check_generate_args(model, input_ids, cache_mode, generate_kwargs)
    modules = clex_modules(model)
    saved = [(m.cache_mode, m.t_override, m._recorded_ids) for m in modules]
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    try:
        for m in modules:
            m.cache_mode = cache_mode
            if cache_mode == "frozen":
                max_new = generate_kwargs.get("max_new_tokens")
                if max_new is None:
                    raise ValueError("cache mode 'frozen' needs max_new_tokens (t is fixed from the final length)")
                m.t_override = frozen_factors(m, input_ids, generate_kwargs.get("attention_mask"), max_new)
            if cache_mode == "recompute":
                m._recorded_ids = input_ids
        if cache_mode == "recompute":
            processors.insert(0, _RecordIds(modules))
        return model.generate(input_ids, logits_processor=processors, **generate_kwargs)
    finally:
        for m, (p, t, ids) in zip(modules, saved, strict=True):
            m.cache_mode, m.t_override, m._recorded_ids = p, t, ids
