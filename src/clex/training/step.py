"""CLEX's training step, shared by ``clex train`` and the stacks people already train with.

The step (docs/design.md §6): one t' per optimizer step, drawn from (seed, step) alone; the rows' positions
extrapolated to span ``0 … L·t' − 1`` with an explicit attention mask (packed rows: per segment, at a
fixed t'); the CLEX matrices in their own parameter group (``clex_lr``, no weight decay) and clipped on
their own; the same cosine schedule with CLEX's own warm-up. ``clex train`` calls these functions, and
so do:

- :class:`CLEXDataCollator`: wraps any collator (transformers', TRL's, or none for equal-length rows)
  and, while the model is in training mode, writes the step's positions and mask into each batch;
- :class:`CLEXTrainer` (``transformers.Trainer``) and ``CLEXSFTTrainer`` (TRL's ``SFTTrainer``), via
  :class:`CLEXTrainerMixin`: the optimizer groups, the clipping, the schedule, the fixed t' of packed
  rows, and the CLEX weights saved beside a LoRA adapter and loaded back on resume.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from clex.errors import check_number, describe
from clex.positions import extrapolated_positions, sample_training_positions
from clex.rotary import clex_modules

VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def check_model(model) -> None:
    """A model, not a path or a name: these helpers work on the model object a Trainer holds."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a transformers model (a torch.nn.Module), got {describe(model)}")


# --- the step's t' and positions ------------------------------------------------------------------
def step_positions(layout: str, chunks: int, length: int, base_length: int, max_factor: int, seed: int, step: int,
                   sampling: str = "uniform"):
    """CLEX's (t', position ids) for optimizer step ``step`` (0-based), from (seed, step) alone. Rows no
    longer than the base length take plain positions at t' = 1 (the original frequencies)."""
    g = torch.Generator().manual_seed(int(np.random.default_rng([seed, step, 7]).integers(2**62)))
    t, pos = sample_training_positions(length, max_factor, g, layout, chunks, base_length, sampling)
    if t == 1 and length <= (base_length or length):
        pos = torch.arange(length)
    return t, pos


def packed_clex_positions(segments: np.ndarray, t: int, layout: str, chunks: int, seed: int, step: int):
    """CLEX's position extrapolation inside each packed segment: every conversation gets its own
    extrapolated positions at the step's t' (which is then set explicitly: the largest position no
    longer says t)."""
    g = torch.Generator().manual_seed(int(np.random.default_rng([seed, step, 11]).integers(2**62)))
    segments = np.asarray(segments)
    out = np.zeros(segments.shape, dtype=np.float32)
    for r, row in enumerate(segments):
        for s in np.unique(row[row >= 0]):
            where = np.flatnonzero(row == s)
            if len(where) > 1:
                out[r, where] = extrapolated_positions(len(where), t, g, layout, chunks).numpy()
    return torch.as_tensor(out)


def clex_batch(input_ids: torch.Tensor, *, labels=None, attention_mask=None, segments=None, t: int = 1, pos=None,
               layout: str = "scatter", chunks: int = 2, seed: int = 0, step: int = 0,
               mask_dtype=torch.bool) -> tuple[dict, int | None]:
    """The model inputs of one training micro-batch, and the t' to fix during its forward (or None).

    Rows of one sequence each: ``attention_mask`` as given (padding) or all ones — never absent, since
    transformers reads gaps in position ids without a mask as packed-sequence boundaries — and, for
    CLEX (``pos`` given), the step's positions on every row. Packed rows (``segments``: a segment id per
    token, −1 for padding): a 4-D mask keeping segments apart and positions restarting per segment,
    extrapolated per segment at t' for CLEX, with t' returned to be fixed."""
    from clex.data.chat import packed_inputs

    device = input_ids.device
    batch = {"input_ids": input_ids, "labels": input_ids if labels is None else labels}
    if segments is None:
        batch["attention_mask"] = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if pos is not None:
            batch["position_ids"] = pos.to(device)[None].expand(input_ids.shape[0], -1)
        return batch, None
    mask, positions = packed_inputs(segments, mask_dtype)
    t_fixed = None
    if pos is not None:
        positions, t_fixed = packed_clex_positions(segments, t, layout, chunks, seed, step), t
    batch["attention_mask"], batch["position_ids"] = mask.to(device), positions.to(device)
    return batch, t_fixed


@contextlib.contextmanager
def fixed_t(model, t: int | None):
    """Hold CLEX's t at ``t`` during a forward (packed rows; None: t follows the positions)."""
    modules = clex_modules(model) if t is not None else []
    saved = [m.t_override for m in modules]
    try:
        for m in modules:
            m.t_override = t
        yield
    finally:
        for m, s in zip(modules, saved, strict=True):
            m.t_override = s


# --- optimizer, schedule, clipping ------------------------------------------------------------------
def param_groups(model, lr: float, clex_lr: float | None = None, weight_decay: float = 0.0):
    """(groups, base params, CLEX params): the trainable base parameters at ``lr`` with ``weight_decay``,
    the CLEX matrices in their own group at ``clex_lr`` (default ``lr``) without decay. ``clex_lr = 0``
    freezes the ODE (no gradients through the solve: NTK α = 2t − 1 with position extrapolation);
    ``lr = 0`` freezes the base model (only the ODE learns; its group stays second, empty)."""
    check_model(model)
    check_number("lr", lr, lambda x: x >= 0, "a finite number >= 0")
    check_number("clex_lr", clex_lr, lambda x: x >= 0, "None or a finite number >= 0", optional=True)
    check_number("weight_decay", weight_decay, lambda x: x >= 0, "a finite number >= 0")
    clex_params = [p for m in clex_modules(model) for p in m.clex_ode.parameters() if p.requires_grad]
    if clex_lr == 0:
        for p in clex_params:
            p.requires_grad_(False)
        clex_params = []
    clex_ids = {id(p) for p in clex_params}
    base_params = [p for p in model.parameters() if p.requires_grad and id(p) not in clex_ids]
    if lr == 0:
        if not clex_params:
            raise ValueError("lr 0 freezes the base model and leaves nothing to train: it needs a CLEX method "
                             "with a clex_lr above 0")
        for p in base_params:
            p.requires_grad_(False)
        base_params = []
    groups = [{"params": base_params, "lr": lr, "weight_decay": weight_decay}]
    if clex_params:
        groups.append({"params": clex_params, "lr": lr if clex_lr is None else clex_lr, "weight_decay": 0.0})
    return groups, base_params, clex_params


def clip_gradients(clip, base_params, clex_params, max_norm: float, clex_max_norm: float | None, parts=None):
    """Clip with ``clip(params, norm)`` (accelerate's ``clip_grad_norm_``): the CLEX matrices on their own
    (``clex_max_norm``; None: one joint norm, the reference). Returns the norm of all gradients before;
    with a dict ``parts``, also stores the base model's and the ODE's norms there (``base``, ``clex``)."""
    if clex_params and clex_max_norm is not None:
        a = clip(base_params, max_norm) if base_params else torch.zeros(())
        b = clip(clex_params, clex_max_norm)
        a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
        if parts is not None:
            parts.update(base=float(a), clex=float(b))
        return torch.sqrt(a**2 + b**2)
    return clip(base_params + clex_params, max_norm)


def cosine_schedule(steps: int, warmup: float, clex_warmup: float | None = None):
    """Learning-rate multipliers (base group, CLEX group) per step: linear warm-up over ``warmup·steps``
    then cosine decay to 0 (transformers' cosine schedule). The CLEX group follows the same curve times
    its own linear ramp over ``clex_warmup·steps``, so the base model can adapt to extrapolated
    positions before the ODE moves."""
    check_number("steps", steps, lambda x: x >= 1, "an integer >= 1", integer=True)
    check_number("warmup", warmup, lambda x: x >= 0, "a fraction of the steps >= 0")
    check_number("clex_warmup", clex_warmup, lambda x: x >= 0, "None or a fraction of the steps >= 0", optional=True)
    warm = int(warmup * steps)

    def base(step: int) -> float:
        if step < warm:
            return step / max(1, warm)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))

    clex_warm = warm if clex_warmup is None else int(clex_warmup * steps)

    def clex(step: int) -> float:
        return base(step) * (min(1.0, step / clex_warm) if clex_warm > warm else 1.0)

    return base, clex
