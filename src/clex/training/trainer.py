"""CLEX's training step inside transformers' ``Trainer`` and TRL's ``SFTTrainer``.

:class:`CLEXDataCollator` wraps any collator and writes the step's positions and mask into each batch;
:class:`CLEXTrainerMixin` gives a trainer CLEX's parameter groups, clipping, schedule and the fixed t' of
packed rows, and keeps the CLEX weights beside a LoRA adapter (saved, and loaded back on resume).
``CLEXTrainer`` and ``CLEXSFTTrainer`` are built on first use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from clex.adapters import ADAPTER_CLEX_FILE, ADAPTER_METHOD_FILE, unfreeze_clex
from clex.errors import check_number, describe
from clex.models import training_length
from clex.rotary import clex_modules
from clex.training.step import (
    VARLEN_KEYS,
    check_model,
    clex_batch,
    clip_gradients,
    cosine_schedule,
    fixed_t,
    param_groups,
    step_positions,
)


def save_method_beside_adapter(model, method: str, path: Path) -> None:
    """A LoRA adapter holds only LoRA weights: keep the method and the trained CLEX matrices beside it
    (``clex.from_pretrained`` reads them back)."""
    from safetensors.torch import save_file

    modules = clex_modules(model)
    record = {"method": method, "rope_parameters": modules[0].settings.to_rope_parameters() if modules else None}
    (Path(path) / ADAPTER_METHOD_FILE).write_text(json.dumps(record, indent=2))
    if modules:
        ode = modules[0].clex_ode
        save_file({"up_proj": ode.up_proj.detach().cpu().contiguous(), "down_proj": ode.down_proj.detach().cpu()},
                  str(Path(path) / ADAPTER_CLEX_FILE))


def load_clex_beside_adapter(model, path) -> bool:
    """Copy the CLEX matrices saved beside an adapter back into ``model`` (True if there were any)."""
    from safetensors.torch import load_file

    file = Path(path) / ADAPTER_CLEX_FILE
    if not file.exists() or not clex_modules(model):
        return False
    weights = load_file(str(file))
    with torch.no_grad():
        for module in clex_modules(model):
            module.clex_ode.up_proj.copy_(weights["up_proj"])
            module.clex_ode.down_proj.copy_(weights["down_proj"])
    return True


# --- the data collator ------------------------------------------------------------------------------
def _stack(examples: list[dict]) -> dict:
    """Equal-length rows of token ids (``input_ids``, optional ``labels``/``attention_mask``) as tensors."""
    from transformers import default_data_collator

    batch = default_data_collator(examples)
    batch.setdefault("labels", batch["input_ids"].clone())
    return batch


def segments_from_positions(position_ids: torch.Tensor) -> np.ndarray:
    """Segment ids of packed rows whose positions restart at 0 for each sequence (TRL's padding-free rows)."""
    starts = (position_ids == 0).long()
    return (starts.cumsum(-1) - 1).cpu().numpy()


class CLEXDataCollator:
    """Wrap a collator so that each training batch carries CLEX's step: t' drawn from (seed, step), the
    position ids and the attention mask exactly as ``clex train`` writes them (scatter or chunks layout;
    ``base_length`` below the row length for the long regime; packed rows, recognised by position ids that
    restart at 0 and no attention mask, extrapolated per segment with t' fixed through ``clex_t``). Outside
    training, or for a model without CLEX, batches pass through unchanged. "Training" is ``training`` when
    set (:class:`CLEXTrainer` sets it: the Trainer collates a step's batches before it calls
    ``model.train()``), else ``model.training``.

    The step is counted from the calls (``grad_accum`` calls per optimizer step, one process's
    micro-batches): use a single-process data loader (``dataloader_num_workers=0``, the default), and let
    :class:`CLEXTrainer` set ``step`` when a run resumes."""

    def __init__(self, model, collator=None, seed: int = 0, layout: str = "scatter", chunks: int = 2,
                 base_length: int | None = None, t_sampling: str = "uniform", grad_accum: int = 1,
                 mask_dtype=torch.bool) -> None:
        from clex.positions import LAYOUTS, T_SAMPLINGS

        check_model(model)
        if collator is not None and not callable(collator):
            raise TypeError(f"collator must be None or a callable (examples → batch), got {describe(collator)}")
        check_number("seed", seed, lambda x: True, "an integer", integer=True)
        for name, value in (("chunks", chunks), ("grad_accum", grad_accum)):
            check_number(name, value, lambda x: x >= 1, "an integer >= 1", integer=True)
        check_number("base_length", base_length, lambda x: x >= 1, "None or an integer >= 1", True, optional=True)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
        self.model, self.collator, self.seed = model, collator or _stack, seed
        self.layout, self.chunks, self.t_sampling = layout, chunks, t_sampling
        self.base_length = base_length or training_length(model)
        self.grad_accum, self.mask_dtype = grad_accum, mask_dtype
        self.calls = 0  # training batches collated so far (this process)
        self.last_t: int | None = None
        self.training: bool | None = None

    @property
    def step(self) -> int:
        return self.calls // self.grad_accum

    @step.setter
    def step(self, value: int) -> None:
        self.calls = value * self.grad_accum

    def __call__(self, examples):
        batch = self.collator(examples)
        modules = clex_modules(self.model)
        if not modules or not (self.model.training if self.training is None else self.training):
            return batch
        step = self.step
        self.calls += 1
        ids = batch["input_ids"]
        max_factor = modules[0].settings.max_factor
        t, pos = step_positions(self.layout, self.chunks, ids.shape[1], self.base_length, max_factor, self.seed, step,
                                self.t_sampling)
        packed = batch.get("attention_mask") is None and batch.get("position_ids") is not None
        segments = segments_from_positions(batch["position_ids"]) if packed else None
        new, t_fixed = clex_batch(ids, labels=batch.get("labels"), attention_mask=batch.get("attention_mask"),
                                  segments=segments, t=t, pos=pos, layout=self.layout, chunks=self.chunks,
                                  seed=self.seed, step=step, mask_dtype=self.mask_dtype)
        extra = {k: v for k, v in batch.items() if k not in new and k not in VARLEN_KEYS}
        self.last_t = t
        if t_fixed is not None:
            new["clex_t"] = t_fixed
        return {**extra, **new}


# --- the Trainer --------------------------------------------------------------------------------------
class CLEXTrainerMixin:
    """What a ``transformers.Trainer`` (or a subclass: TRL's ``SFTTrainer``) needs for CLEX's step.

    Extra arguments: ``clex_lr`` (default: the learning rate; 0 freezes the ODE), ``clex_max_grad_norm``
    (CLEX clipped on its own, default 1.0; None: one joint norm, the reference), ``clex_warmup`` (CLEX's own
    warm-up fraction), ``clex_method`` (recorded beside LoRA adapters). A ``data_collator`` that is not a
    :class:`CLEXDataCollator` is wrapped in one (seeded with ``args.seed``)."""

    def __init__(self, *args, clex_lr: float | None = None, clex_max_grad_norm: float | None = 1.0,
                 clex_warmup: float | None = None, clex_method: str = "clex", **kwargs) -> None:
        from transformers import TrainerCallback

        from clex.methods import check_method

        check_number("clex_lr", clex_lr, lambda x: x >= 0, "None (the learning rate) or a number >= 0", optional=True)
        check_number("clex_max_grad_norm", clex_max_grad_norm, lambda x: x > 0,
                     "None (one joint norm) or a number > 0", optional=True)
        check_number("clex_warmup", clex_warmup, lambda x: 0 <= x <= 1, "None or a fraction of the steps in [0, 1]",
                     optional=True)
        if not isinstance(clex_method, str):
            raise TypeError(f"clex_method must be a method such as 'clex' (a str), got {describe(clex_method)}")
        check_method(clex_method)
        super().__init__(*args, **kwargs)
        self.clex_lr, self.clex_max_grad_norm, self.clex_warmup = clex_lr, clex_max_grad_norm, clex_warmup
        self.clex_method = clex_method
        unfreeze_clex(self.model, clex_lr != 0)  # peft freezes everything but its adapters: CLEX trains
        collator = self.data_collator
        if not isinstance(collator, CLEXDataCollator):
            collator = CLEXDataCollator(self.model, collator, seed=self.args.seed)
            self.data_collator = collator
        collator.grad_accum = self.args.gradient_accumulation_steps
        trainer = self

        class _SyncStep(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):  # a resumed run continues the step count
                collator.step = state.global_step
                collator.model, collator.training = trainer.model, True

            def on_train_end(self, args, state, control, **kw):
                collator.training = None

        self.add_callback(_SyncStep())
        self._clex_optimizer = False  # the optimizer was built here, with CLEX's group second

    def create_accelerator_and_postprocess(self):
        """On CPU processes accelerate trains DDP even when ``args.fsdp`` asks for FSDP: set it (FSDP2)."""
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled and self.accelerator.distributed_type == "MULTI_CPU":
            from accelerate import FullyShardedDataParallelPlugin

            from clex.training.distributed import fsdp_on_cpu

            fsdp_on_cpu(self.accelerator, FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
            self.is_fsdp_enabled = True

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            if self.args.learning_rate == 0:
                raise ValueError("learning_rate 0 (only the CLEX ODE learns) is a `clex train` option (--lr 0); "
                                 "here, freeze the model's parameters with requires_grad_(False) instead")
            groups, _, _ = param_groups(self.model, self.args.learning_rate, self.clex_lr, self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            self._clex_optimizer = True
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """transformers' cosine schedule, with CLEX's own warm-up on its group (``clex train``'s schedule)."""
        from transformers.trainer_utils import SchedulerType

        if self.lr_scheduler is None and SchedulerType(self.args.lr_scheduler_type) == SchedulerType.COSINE:
            optimizer = optimizer or self.optimizer
            warmup = self.args.get_warmup_steps(num_training_steps) / max(1, num_training_steps)
            lambdas = list(cosine_schedule(num_training_steps, warmup, self.clex_warmup)[: len(optimizer.param_groups)])
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def _clip_grad_norm(self, model):
        groups = self.optimizer.param_groups  # FSDP swaps the parameters after the optimizer is built: read them here
        if not self._clex_optimizer or len(groups) < 2 or self.clex_max_grad_norm is None:
            return super()._clip_grad_norm(model)
        base, clex = groups[0]["params"], groups[1]["params"]
        return clip_gradients(self.accelerator.clip_grad_norm_, base, clex, self.args.max_grad_norm,
                              self.clex_max_grad_norm)

    def compute_loss(self, model, inputs, *args, **kwargs):
        with fixed_t(model, inputs.pop("clex_t", None)):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        return self._outside_training(super().evaluate, *args, **kwargs)

    def predict(self, *args, **kwargs):
        return self._outside_training(super().predict, *args, **kwargs)

    def _outside_training(self, run, *args, **kwargs):
        collator, saved = self.data_collator, self.data_collator.training
        collator.training = False
        try:
            return run(*args, **kwargs)
        finally:
            collator.training = saved

    def prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop("clex_t", None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save and _is_peft(model):
            save_method_beside_adapter(model, self.clex_method, Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_clex_beside_adapter(model or self.model, resume_from_checkpoint)


def _is_peft(model) -> bool:
    return type(model).__module__.startswith("peft")


def _trainer_class():
    from transformers import Trainer

    class CLEXTrainer(CLEXTrainerMixin, Trainer):
        """``transformers.Trainer`` with CLEX's training step (see :class:`CLEXTrainerMixin`)."""

    return CLEXTrainer


def _sft_trainer_class():
    try:
        from trl import SFTTrainer
    except ImportError:  # pragma: no cover - trl is an optional extra
        raise ImportError("CLEXSFTTrainer needs TRL: pip install trl") from None

    class CLEXSFTTrainer(CLEXTrainerMixin, SFTTrainer):
        """TRL's ``SFTTrainer`` with CLEX's training step (see :class:`CLEXTrainerMixin`)."""

    return CLEXSFTTrainer


_LAZY = {"CLEXTrainer": _trainer_class, "CLEXSFTTrainer": _sft_trainer_class}


def __getattr__(name: str):
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
