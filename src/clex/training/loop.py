"""Fine-tuning for CLEX and the baselines (``clex train``), on ``accelerate``.

One loop for every method. Each optimizer step consumes one global batch of ``train_length``-token
samples from a seeded permutation of the packed data; CLEX draws one t' per step and feeds the
extrapolated position ids of docs/design.md §6 (with an all-ones attention mask), fixed-factor methods
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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from clex import data as D
from clex.adapters import unfreeze_clex
from clex.io.checkpoint import full_model_state, is_sharded
from clex.io.progress import progress_bar
from clex.io.train_run import (
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
from clex.io.train_run import checkpoints as _checkpoints
from clex.io.train_run import trim_metrics as _trim_metrics
from clex.loading import check_model_path, from_pretrained
from clex.methods import MethodSpec, parse_method
from clex.models import supported_length, training_length, use_method
from clex.rotary import clex_modules
from clex.training.distributed import fresh_precision, fsdp_plugin, require_fsdp
from clex.training.options import TrainConfig, parse_lora, validate
from clex.training.step import (
    clex_batch,
    clip_gradients,
    cosine_schedule,
    fixed_t,
    param_groups,
    step_positions,
)
from clex.training.trainer import save_method_beside_adapter


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
    from clex.data.chat import ChatStats, build_rows, load_conversations

    stats = ChatStats()
    return build_rows(tok, load_conversations(cfg.data, cfg.on_bad_record, stats), length, cfg.pack, stats)


# --- model ----------------------------------------------------------------------------------------
def prepare_model(cfg: TrainConfig):
    """Load the model, switch its method, check the train length. Returns (model, L, train length)."""
    check_model_path(cfg.model)
    spec = MethodSpec(cfg.method)  # parsed once: use_method and supported_length take it as it is
    model = use_method(from_pretrained(cfg.model, attn_implementation="sdpa"), spec)
    L = training_length(model)
    length = cfg.train_length or L
    name, supported = spec.name, supported_length(model, spec)
    if name == "clex" and length < L:
        raise TrainError(
            f"train length {length} is shorter than the model's training length L = {L}: CLEX training places a "
            f"row's {length} tokens over positions 0 … L·t′ − 1, so each row would be a sparse sample of a context "
            f"{L // length}× longer than itself at every t′ (not a regime CLEX is trained in). Train at "
            f"`train_length` {L} or more, or, if the model was really trained at {length} tokens, declare that L: "
            f"`base_length` {length}"
        )
    if length > supported:
        raise TrainError(
            f"train length {length} is longer than {cfg.method} supports on this model ({supported} tokens: "
            f"L = {L}); use a scaling factor of at least {math.ceil(length / L)} or a shorter `train_length`"
        )
    return model, L, length


def add_lora(model, spec: str):
    from peft import LoraConfig, get_peft_model

    r, alpha, targets = parse_lora(spec)
    unknown = [t for t in targets if not any(name.split(".")[-1] == t for name, _ in model.named_modules())]
    if unknown:
        raise TrainError(f"`lora` targets {unknown} name no module of the model (e.g. q_proj, v_proj)")
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

    validate(cfg)
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
                                     "gives non-finite logits on this data; check its weights (not `lr`)")
                raise TrainError(f"loss became {loss_mean} at step {step + 1}; lower `lr` (checkpoints kept)")
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
    return (f"training interrupted; {where} in {out}: run the same command with `resume` to continue"
            + ("" if cfg.save_every else " (pass `save_every` to checkpoint during a run)"))


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
    raise TrainError(f"`pack` needs sdpa or eager attention (a 4-D mask), not {impl}")


def _bar(cfg: TrainConfig, accelerator, start: int):
    show = cfg.show_progress and accelerator.is_main_process
    return progress_bar(cfg.steps, show, initial=start, unit="step", desc=f"train {cfg.method}")


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
