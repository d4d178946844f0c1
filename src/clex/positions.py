"""Where tokens sit: the positions a CLEX training step feeds, and the length each token's sequence has.

Training (the reference's recipe, docs/design.md §6): one t' per step and ``length`` positions spanning
``0 … L·t' − 1``, so the rotary module infers exactly t'. Inference: every sequence of a batch follows its own
length — a row of a padded batch, or each sequence packed into a row — so :func:`token_lengths` gives each token
``1 +`` the largest attended position of its sequence.
"""

from __future__ import annotations

import torch

LAYOUTS = ("scatter", "chunks")
T_SAMPLINGS = ("uniform", "log")


def token_lengths(position_ids: torch.Tensor, attend: torch.Tensor | None = None) -> torch.Tensor:
    """For every token, the length n of its sequence so far: 1 + the largest attended position among the tokens of
    its sequence in this forward. A sequence is a run of increasing positions within a row (packed rows restart at
    0; a cached prefix continues from where it stopped). ``attend`` ([batch, tokens], the attention mask of these
    tokens) leaves padding out, so a right-padded row keeps its own length; without it every token counts."""
    pos = position_ids.long()
    if attend is not None:
        pos = pos.expand(attend.shape[0], -1) if pos.shape[0] != attend.shape[0] else pos
    start = torch.ones_like(pos, dtype=torch.bool)
    start[..., 1:] = pos[..., 1:] <= pos[..., :-1]
    sequence = start.long().cumsum(-1) - 1
    value = pos if attend is None else pos.masked_fill(~attend.to(torch.bool), -1)
    longest = torch.full_like(pos, -1).scatter_reduce(-1, sequence, value, "amax", include_self=True)
    return (longest.gather(-1, sequence) + 1).clamp(min=1)


# --- training-time sampling ------------------------------------------------------------------------
def sample_scale_factor(max_factor: int, generator: torch.Generator | None = None, sampling: str = "uniform") -> int:
    """The training step's t' in the integers 1 … max_factor (1 included, as the reference).

    ``uniform`` (the reference): each equally likely. ``log`` (ours, an option of the reproduction
    study): P(t') ∝ 1/t', i.e. even mass per octave of length, so short contexts (t' = 1 about 30%
    of the steps at max_factor 16) keep more of the budget.
    """
    if not isinstance(max_factor, int) or max_factor < 1:
        raise ValueError(f"max_factor must be an integer >= 1, got {max_factor!r}")
    if sampling == "uniform":
        return int(torch.randint(1, max_factor + 1, (1,), generator=generator).item())
    if sampling == "log":
        weights = 1.0 / torch.arange(1, max_factor + 1, dtype=torch.float64)
        return int(torch.multinomial(weights, 1, generator=generator).item()) + 1
    raise ValueError(f"t' sampling must be one of {T_SAMPLINGS}, got {sampling!r}")


def extrapolated_positions(
    length: int,
    t: int,
    generator: torch.Generator | None = None,
    layout: str = "scatter",
    chunks: int = 2,
    base_length: int | None = None,
) -> torch.Tensor:
    """Position ids for ``length`` training tokens that make the model see distances up to ``L·t``
    (docs/design.md §6), where ``L = base_length`` (default: ``length``).

    First 0, last ``L·t − 1``, strictly increasing, so the CLEX rotary module infers exactly ``t``.
    ``scatter`` (the reference): ``length − 2`` inner positions drawn at random without replacement
    from ``1 … length·t − 2``. ``chunks``: ``chunks`` contiguous runs of random lengths with random
    skips between them (PoSE-like), which keeps short offsets exact.

    Training longer than the base context (``length = k·L``, the reference's long regime): the
    positions are scaled by ``(L·t − 1)/(length·t − 1) ≈ 1/k`` (fractional ids), so ``t = 1`` is
    position interpolation by k and ``t = k`` is nearly contiguous ``0 … length − 1``. Unlike the
    reference's ``/k``, the last position stays above the one before it.

    Pass an explicit all-ones ``attention_mask`` with these ids: without one, transformers reads
    gaps in ``position_ids`` as boundaries of packed sequences and blocks attention across them.
    """
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer >= 2, got {length!r}")
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"t must be an integer >= 1, got {t!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if base_length is not None and (not isinstance(base_length, int) or base_length < 1):
        raise ValueError(f"base_length must be a positive integer, got {base_length!r}")
    raw = _raw_positions(length, t, generator, layout, chunks)
    L = base_length or length
    if L == length:
        return raw
    return raw.double().mul_((L * t - 1) / (length * t - 1)).float()


def _raw_positions(length: int, t: int, generator, layout: str, chunks: int) -> torch.Tensor:
    """``length`` integer positions in ``0 … length·t − 1``, first and last included."""
    span = length * t
    if t == 1:
        return torch.arange(length)
    if layout == "scatter":
        inner = torch.randperm(span - 2, generator=generator)[: length - 2].sort().values + 1
        return torch.cat([torch.tensor([0]), inner, torch.tensor([span - 1])])
    if not isinstance(chunks, int) or chunks < 2 or chunks > length:
        raise ValueError(f"chunks must be an integer in [2, length] (one run cannot reach length·t), got {chunks!r}")
    # Random run lengths (each >= 1) and random skips between runs; the first run starts at 0 and
    # the last ends at span - 1, so all span - length unused positions fall between runs.
    size_cuts = (torch.randperm(length - 1, generator=generator)[: chunks - 1] + 1).sort().values
    size_bounds = [0, *size_cuts.tolist(), length]
    skip_total = span - length
    skip_cuts = torch.randint(0, skip_total + 1, (chunks - 2,), generator=generator).sort().values.tolist()
    skip_bounds = [0, *skip_cuts, skip_total]
    out, pos = [], 0
    for i in range(chunks):
        if i > 0:
            pos += skip_bounds[i] - skip_bounds[i - 1]
        size = size_bounds[i + 1] - size_bounds[i]
        out.append(torch.arange(pos, pos + size))
        pos += size
    return torch.cat(out)


def sample_training_positions(
    length: int,
    max_factor: int,
    generator: torch.Generator | None = None,
    layout: str = "scatter",
    chunks: int = 2,
    base_length: int | None = None,
    sampling: str = "uniform",
) -> tuple[int, torch.Tensor]:
    """One CLEX training step's ``(t', position_ids)``: t' in 1 … max_factor (``sampling``, see
    :func:`sample_scale_factor`), then ``length`` positions spanning ``0 … L·t' − 1`` (``L =
    base_length``, the model's CLEX training length; default ``length``). Feeding these ids (with an
    all-ones attention mask) makes the CLEX rotary module solve the ODE to exactly t' with gradients."""
    t = sample_scale_factor(max_factor, generator, sampling)
    return t, extrapolated_positions(length, t, generator, layout, chunks, base_length)
