"""The options of a training run (``TrainConfig``), each declared once, and their validation."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from clex.data.chat import BAD_RECORD_ACTIONS
from clex.io.train_run import TrainError
from clex.methods import MethodSpec
from clex.positions import LAYOUTS, T_SAMPLINGS
from clex.training.distributed import FSDP_MODES, PRECISIONS

FORMATS = ("text", "chat")


def option(default=MISSING, help: str = "", *, choices: tuple | None = None, flag: str | None = None):
    """A ``TrainConfig`` field with what the command line shows for it: its help, its choices (also checked by
    :func:`validate`) and, where it is not ``--<name>``, its flag (a True default gives a ``--no-…`` switch)."""
    meta = {"help": help, "choices": choices, "flag": flag}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every option of a training run, declared once: ``clex train``'s flags, help and defaults are derived
    from these fields (``clex.cli.main``), and :func:`validate` checks them before any work."""

    model: str = option(help="model directory (or hub name)")
    out: str = option(help="output directory of the run")
    method: str = option("clex", "clex[:params], pi:factor=F, yarn:factor=F, ntk:factor=F, vanilla …")
    data: str = option("sotu:train", "anything `clex eval ppl --data` takes")
    text_field: str = option("text", "the field (JSONL) or column (parquet) holding the text")
    tokenizer: str | None = option(None, "tokenizer directory or `bytes` (default: the model's)")
    train_length: int | None = option(None, "tokens per sample (default: the model's L)")
    steps: int = option(100, "optimizer steps")
    batch_size: int = option(1, "samples per process and micro-step")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    lr: float = option(2e-5, "learning rate of the model (0 freezes it: only the CLEX ODE learns, at --clex-lr)")
    clex_lr: float | None = option(None, "learning rate of the CLEX matrices (default: --lr; 0 freezes them)")
    clex_warmup: float | None = option(None, "CLEX's own linear warm-up, a fraction of the steps (default: --warmup)")
    weight_decay: float = option(0.0, "weight decay of the model's parameters (never of CLEX's)")
    warmup: float = option(0.03, "warm-up fraction of the cosine schedule")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    clex_max_grad_norm: float | None = option(
        1.0, "CLEX's gradients are clipped on their own to this norm (None, or --joint-clip: one norm for all, the "
        "reference)")
    layout: str = option("scatter", "CLEX training positions: scatter (reference) or chunks (contiguous runs)",
                         choices=LAYOUTS)
    chunks: int = option(2, "with --layout chunks: contiguous runs per row")
    t_sampling: str = option("uniform", "CLEX's t' per step: uniform on 1…max_factor (reference) or log (P ∝ 1/t')",
                             choices=T_SAMPLINGS)
    seed: int = option(0, "seed of the sample order, t' and the positions")
    lora: str | None = option(None, "LoRA as r,alpha,target[,target…], e.g. 8,16,q_proj,v_proj")
    merge: bool = option(False, "with --lora: save merged weights")
    gradient_checkpointing: str = option("auto", "auto: on from 2048 tokens (non-reentrant)",
                                         choices=("auto", "on", "off"))
    save_every: int = option(0, "checkpoint every K steps (0: only the final model)")
    keep: int = option(2, "checkpoints to keep (at least 1: the run resumes from them)")
    resume: bool = option(False, "continue the run in --out from its last checkpoint, with the same settings "
                          "(refused otherwise; a finished run is left as it is)")
    overwrite: bool = option(False, "replace the run in --out (removes only what clex wrote there, as its manifest "
                             "lists)")
    show_progress: bool = option(True, "progress bars", flag="--no-progress")
    format: str = option("text", "text: language modelling; chat: records with `messages` (system/user/assistant), "
                         "loss on assistant tokens only", choices=FORMATS)
    pack: bool = option(False, "chat: pack several conversations per row, attention kept inside each (default: one "
                        "conversation per row, padded)")
    precision: str = option("auto", "bf16: autocast (weights, optimizer states and the CLEX ODE stay fp32), on CPU "
                            "too; auto: bf16 on a GPU that supports it, else fp32", choices=PRECISIONS)
    fsdp: str | None = option(None, "shard the model over the launched processes (FSDP2; CLEX's module is its own "
                              "unit; an accelerate FSDP config sets it too)", choices=FSDP_MODES)
    on_bad_record: str = option("error", "chat: stop at a malformed record, or skip it and count it",
                                choices=BAD_RECORD_ACTIONS)


def parse_lora(spec: str) -> tuple[int, float, list[str]]:
    """``r,alpha,target[,target…]``, checked."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    try:
        r, alpha, targets = int(parts[0]), float(parts[1]), parts[2:]
    except (IndexError, ValueError):
        example = "8,16,q_proj,v_proj"
        raise TrainError(f"`lora` must look like r,alpha,target[,target…] (e.g. {example}), got {spec!r}") from None
    if r < 1 or not targets or not (alpha > 0 and math.isfinite(alpha)):
        raise TrainError(f"`lora` needs r >= 1, alpha > 0 and at least one target module, got {spec!r}")
    return r, alpha, targets


def validate(cfg: TrainConfig) -> None:
    """Every option checked before any work, each refusal naming its option (`steps`)."""
    method = MethodSpec(cfg.method)
    for f in fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and value not in choices and not (value is None and f.default is None):
            raise TrainError(f"`{f.name}` must be one of {', '.join(choices)}, got {value!r}")
    for name in ("steps", "batch_size", "grad_accum"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise TrainError(f"`{name}` must be a positive integer, got {value!r}")
    if cfg.train_length is not None and cfg.train_length < 2:
        raise TrainError(f"`train_length` must be at least 2, got {cfg.train_length}")
    if not (cfg.lr >= 0 and math.isfinite(cfg.lr)) or (cfg.clex_lr is not None and not cfg.clex_lr >= 0):
        raise TrainError(f"learning rates must be finite and >= 0, got lr={cfg.lr}, clex_lr={cfg.clex_lr}")
    if cfg.lr == 0 and (method.name != "clex" or cfg.clex_lr in (None, 0) or cfg.lora):
        raise TrainError("`lr` 0 freezes the base model, so only the CLEX ODE can learn: it needs `method` clex, "
                         "`clex_lr` above 0, and no `lora`")
    for name in ("warmup", "clex_warmup"):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value <= 1:
            raise TrainError(f"`{name}` must be a fraction of the steps in [0, 1], got {value!r}")
    if cfg.merge and not cfg.lora:
        raise TrainError("`merge` only applies to `lora` runs")
    if cfg.pack and cfg.format != "chat":
        raise TrainError("`pack` applies to `format` chat (text is always packed)")
    for name, least in (("save_every", 0), ("keep", 1)):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TrainError(f"`{name}` must be an integer >= {least}, got {value!r}"
                             + (" (the checkpoints a run keeps to resume from)" if name == "keep" else ""))
    if cfg.layout == "chunks" and (isinstance(cfg.chunks, bool) or not isinstance(cfg.chunks, int) or cfg.chunks < 2
                                   or (cfg.train_length is not None and cfg.chunks > cfg.train_length)):
        raise TrainError(f"`chunks` must be an integer from 2 to the train length (one run cannot span L·t'), "
                         f"got {cfg.chunks!r}")
    if cfg.train_length is not None and (isinstance(cfg.train_length, bool) or not isinstance(cfg.train_length, int)):
        raise TrainError(f"`train_length` must be an integer, got {cfg.train_length!r}")
    if cfg.clex_lr is not None and not math.isfinite(cfg.clex_lr):
        raise TrainError(f"`clex_lr` must be finite, got {cfg.clex_lr}")
    if not (cfg.max_grad_norm > 0 and math.isfinite(cfg.max_grad_norm)):
        raise TrainError(f"`max_grad_norm` must be positive and finite, got {cfg.max_grad_norm}")
    clex_norm = cfg.clex_max_grad_norm
    if clex_norm is not None and not (clex_norm > 0 and math.isfinite(clex_norm)):
        raise TrainError(f"`clex_max_grad_norm` must be positive and finite, got {cfg.clex_max_grad_norm}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise TrainError(f"`weight_decay` must be >= 0 and finite, got {cfg.weight_decay}")
    if cfg.fsdp and cfg.lora:
        raise TrainError("`fsdp` with `lora` is not supported: LoRA's trainable weights are small, use DDP")
    if cfg.lora:
        parse_lora(cfg.lora)
