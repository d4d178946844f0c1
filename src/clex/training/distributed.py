"""How ``clex train`` sets up accelerate: the precision, FSDP2 with CLEX's module as its own unit, and FSDP on
CPU processes (which accelerate leaves to DDP)."""

from __future__ import annotations

import os

import torch

from clex.io.train_run import TrainError
from clex.rotary import clex_modules

PRECISIONS = ("auto", "fp32", "bf16")
FSDP_MODES = ("full_shard",)


def fsdp_plugin(cfg, model):
    """FSDP2 (``fully_shard``) for ``fsdp="full_shard"`` or an accelerate FSDP config (its other settings are
    read from the environment). CLEX's rotary module is its own unit beside the decoder layers, so the CLEX
    matrices stay fp32 whatever the layers' dtype and take no part in the layers' reductions."""
    from_config = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if not (cfg.fsdp or from_config):
        return None
    from accelerate import FullyShardedDataParallelPlugin

    layers = list(getattr(model, "_no_split_modules", None) or [])
    if not layers:
        raise TrainError(f"`fsdp`: {type(model).__name__} names no decoder-layer class to shard by")
    wrap = layers + (["CLEXRotary"] if clex_modules(model) else [])
    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
                                          auto_wrap_policy="transformer_based_wrap", cpu_ram_efficient_loading=False,
                                          transformer_cls_names_to_wrap=wrap)


def require_fsdp(accelerator, plugin) -> None:
    """FSDP over the launched processes: set on CPU processes (see :func:`fsdp_on_cpu`), refused on one."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise TrainError("`fsdp` shards a model over several processes: launch with `accelerate launch` or "
                         "`python -m torch.distributed.run --nproc_per_node N -m clex train …`")
    fsdp_on_cpu(accelerator, plugin)


def fresh_precision(precision: str) -> str:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another precision: an
    in-process run (a notebook, the tests) that changes it starts from a fresh state."""
    from accelerate.state import AcceleratorState

    wanted = mixed_precision(precision)
    if AcceleratorState._shared_state and str(AcceleratorState._shared_state.get("_mixed_precision", wanted)) != wanted:
        AcceleratorState._reset_state()
    return wanted


def mixed_precision(precision: str = "auto") -> str:
    """accelerate's mixed precision: bf16 autocast (weights, optimizer and the CLEX ODE stay fp32) or none."""
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return "bf16"
    return "no"


def fsdp_on_cpu(accelerator, plugin) -> None:
    """accelerate (1.15) switches FSDP on only for accelerator devices: on CPU processes (gloo) it trains DDP
    without a word. FSDP2 shards CPU processes, so clex sets it explicitly."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.device = torch.device("cpu")
