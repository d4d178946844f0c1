"""Fine-tuning: the options of a run, the CLEX training step, and the two ways to run it.

``options`` declares every training option once (``TrainConfig``; the CLI's flags are derived from it),
``step`` is the pure training step (t' and positions from the seed and step, parameter groups, clipping,
schedule), ``loop`` is ``clex train`` on accelerate, ``trainer`` puts the same step into transformers'
Trainer and TRL's SFTTrainer, ``distributed`` holds the FSDP and precision settings. May import the core,
``clex.data`` and ``clex.io``; not evaluation, serving or the CLI.
"""

from clex.training.loop import train
from clex.training.options import TrainConfig
from clex.training.step import (
    VARLEN_KEYS,
    clex_batch,
    clip_gradients,
    cosine_schedule,
    fixed_t,
    packed_clex_positions,
    param_groups,
    step_positions,
)
from clex.training.trainer import (
    CLEXDataCollator,
    CLEXTrainerMixin,
    load_clex_beside_adapter,
    save_method_beside_adapter,
    segments_from_positions,
)

__all__ = [
    "VARLEN_KEYS", "CLEXDataCollator", "CLEXSFTTrainer", "CLEXTrainer", "CLEXTrainerMixin", "TrainConfig",
    "clex_batch", "clip_gradients", "cosine_schedule", "fixed_t", "load_clex_beside_adapter",
    "packed_clex_positions", "param_groups", "save_method_beside_adapter", "segments_from_positions",
    "step_positions", "train",
]


def __getattr__(name: str):
    """``CLEXTrainer`` and ``CLEXSFTTrainer`` are built on first use (TRL is imported only then)."""
    if name in ("CLEXTrainer", "CLEXSFTTrainer"):
        from clex.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
