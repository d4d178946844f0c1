"""Training checkpoints in formats that cannot run code: safetensors for tensors, JSON for the rest.

accelerate's ``save_state``/``load_state`` pickle the optimizer, the scheduler, the RNG states and any
registered object, and unpickle them on resume (``torch.load(weights_only=False)`` for custom state):
a file placed in a checkpoint would run as code. clex writes its own checkpoint instead:

    model.safetensors        the model's full state (gathered under FSDP), with its own names
    optimizer.safetensors    every tensor of the optimizer state, keyed ``<parameter name>//<name>``
    optimizer.json           the param groups and the non-tensor state
    scheduler.json           the LR scheduler's state dict (plain numbers)
    rng-<rank>.safetensors   torch's CPU (and CUDA) generator state of each process
    trainer_state.json       {"step": N}: written last, so it marks a complete checkpoint

Full state dicts come from ``torch.distributed.checkpoint.state_dict``, so one format serves one
process, DDP and FSDP (a sharded run resumes from it, on any number of processes). Every file read
back is parsed as safetensors or JSON only; a damaged one raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
MODEL, OPTIM, OPTIM_META, SCHED = "model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json"
FILES = (MODEL, OPTIM, OPTIM_META, SCHED, STATE_FILE)


class CheckpointError(ValueError):
    """A checkpoint file that is missing or cannot be read; the message names it."""


def _rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def _json(value):
    """Optimizer hyper-parameters as JSON (tuples become lists; read back as tuples)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_json(v) for v in value]}
    if isinstance(value, list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def _unjson(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_unjson(v) for v in value["__tuple__"])
        return {k: _unjson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    return value


def _options(model, **kw):
    """Full (unsharded) state dicts, gathered to CPU under FSDP; the same call for one process and DDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model), **kw)


def is_sharded(model) -> bool:
    """True for a model whose parameters FSDP2 has sharded (DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The model's whole state dict with its own names (gathered from every process under FSDP: call it on all)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(model))


def save(path: Path, model, optimizer, scheduler, step: int, rank: int = 0, main: bool = True) -> None:
    """Write a checkpoint of ``model`` (as prepared: plain, DDP or FSDP), ``optimizer`` and ``scheduler`` into
    ``path``. Every process calls it (FSDP gathers the full state); the main one writes the shared files."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
    path.mkdir(parents=True, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(path / _rng_file(rank)))
    if not main:
        return
    seen: set[int] = set()
    weights = {}
    for key, value in model_state.items():  # tied weights share storage: safetensors takes each tensor once
        value = value.detach().cpu()
        weights[key] = value.clone() if value.data_ptr() in seen else value.contiguous()
        seen.add(value.data_ptr())
    save_file(weights, str(path / MODEL))
    tensors, other = {}, {}
    for name, entries in optim_state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{name}//{key}"] = value.detach().cpu().contiguous()
            else:
                other[f"{name}//{key}"] = _json(value)
    save_file(tensors, str(path / OPTIM))
    (path / OPTIM_META).write_text(json.dumps({"param_groups": _json(optim_state["param_groups"]), "state": other}))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (path / SCHED).write_text(json.dumps(_json(sched)))
    (path / STATE_FILE).write_text(json.dumps({"step": step}))


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return value


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error type for a damaged header or body
        raise CheckpointError(f"{file} is not a readable safetensors file ({str(err).splitlines()[0][:120]})") from None


def step_of(path: Path) -> int:
    """The step a checkpoint was written at (its state file, checked)."""
    step = _read_json(path / STATE_FILE).get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / STATE_FILE} does not name a step")
    return step


def _read(path: Path, rank: int):
    """Every file of the checkpoint, each read once and checked before anything is loaded into the run."""
    step = step_of(path)
    weights, tensors, rng = (_read_tensors(path / name) for name in (MODEL, OPTIM, _rng_file(rank)))
    meta = _read_json(path / OPTIM_META)
    if not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("state"), dict):
        raise CheckpointError(f"{path / OPTIM_META} lacks the optimizer's param groups")
    return step, weights, tensors, meta, _read_json(path / SCHED), rng


def load(path: Path, model, optimizer, scheduler, rank: int = 0) -> int:
    """Restore a checkpoint written by :func:`save` into the same (prepared) objects; returns its step."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    step, weights, tensors, meta, sched, rng = _read(path, rank)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    state: dict[str, dict] = {}
    for key, value in [*tensors.items(), *_unjson(meta["state"]).items()]:
        name, _, entry = key.rpartition("//")
        state.setdefault(name, {})[entry] = value
    try:
        set_state_dict(model, optimizer, model_state_dict=weights,
                       optim_state_dict={"state": state, "param_groups": _unjson(meta["param_groups"])},
                       options=_options(model))  # fmt: skip
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path} does not fit the model and optimizer being trained "
                              f"({str(err).splitlines()[0][:160]}); it belongs to another run") from None  # fmt: skip
    scheduler.load_state_dict({**scheduler.state_dict(), **_unjson(sched)})
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")] or
                                     torch.cuda.get_rng_state_all())  # fmt: skip
    return step
