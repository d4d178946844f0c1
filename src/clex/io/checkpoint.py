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
import math
from pathlib import Path

import torch

from clex.errors import DamagedFile
from clex.jsonfile import JSONFileError, read_json

STATE_FILE = "trainer_state.json"
MODEL, OPTIM, OPTIM_META, SCHED = "model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json"
FILES = (MODEL, OPTIM, OPTIM_META, SCHED, STATE_FILE)


CheckpointError = DamagedFile  # the name checkpoint code raises


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
        return read_json(file)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except JSONFileError as err:
        raise CheckpointError(str(err)) from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error type for a damaged header or body
        raise CheckpointError(f"{file} is not a readable safetensors file ({str(err).splitlines()[0][:120]})") from None


def step_of(path: Path, expected: int | None = None, steps: int | None = None) -> int:
    """The step a checkpoint was written at (its state file), checked: an integer from 1 to the run's
    ``steps``, equal to ``expected`` (the number in the checkpoint's name) when given."""
    file = path / STATE_FILE
    step = _read_json(file).get("step")
    if type(step) is not int or step < 1 or (steps is not None and step > steps):
        raise CheckpointError(f"{file} names step {step!r}, not a step of this run"
                              + (f" (1 to {steps})" if steps is not None else ""))
    if expected is not None and step != expected:
        raise CheckpointError(f"{file} names step {step} in a checkpoint named for step {expected}")
    return step


def _finite_numbers(value, file: Path, where: str) -> None:
    """Every number in a JSON state is finite (an absurd value is a damaged file, not a training setting)."""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, f"{at}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise CheckpointError(f"{file} holds {item} at {at}")


def _check_optimizer(path: Path, meta: dict, tensors: dict[str, torch.Tensor], weights: dict) -> None:
    """AdamW's hyper-parameters in range, its moments finite and shaped like the weights they belong to."""
    file = path / OPTIM_META
    _finite_numbers(meta, file, "")
    # far beyond any rate a run uses, yet finite in float32 (where a larger one overflows mid-step)
    ranges = {"lr": (0, 1e3), "eps": (1e-30, 1.0), "weight_decay": (0, 1e3), "initial_lr": (0, 1e3)}
    for i, group in enumerate(meta["param_groups"]):
        if not isinstance(group, dict):
            raise CheckpointError(f"{file}: param group {i} is not an object")
        for key, (low, high) in ranges.items():
            value = group.get(key, low)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise CheckpointError(f"{file}: param group {i} has {key} = {value!r}")
        betas = _unjson(group.get("betas", (0.9, 0.999)))
        if not (isinstance(betas, tuple | list) and len(betas) == 2 and
                all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise CheckpointError(f"{file}: param group {i} has betas = {betas!r}")
    for key, value in tensors.items():
        name, _, entry = key.rpartition("//")
        if not torch.isfinite(value.float()).all():
            raise CheckpointError(f"{path / OPTIM} holds non-finite values in {key}")
        if entry in ("exp_avg", "exp_avg_sq") and name in weights and value.shape != weights[name].shape:
            raise CheckpointError(f"{path / OPTIM}: {key} has shape {tuple(value.shape)}, its weight "
                                  f"{tuple(weights[name].shape)}")


def _check_scheduler(path: Path, sched: dict, step: int) -> None:
    """The LR scheduler's counters agree with the checkpoint's step and its rates are plain numbers."""
    file = path / SCHED
    _finite_numbers(sched, file, "")
    if sched.get("last_epoch") != step or type(sched.get("last_epoch")) is not int:
        raise CheckpointError(f"{file} is at step {sched.get('last_epoch')!r}, the checkpoint at {step}")
    for key in ("base_lrs", "_last_lr"):
        rates = sched.get(key, [])
        if not (isinstance(rates, list) and all(isinstance(r, int | float) and not isinstance(r, bool) and
                                                0 <= r <= 1e3 for r in rates)):
            raise CheckpointError(f"{file}: {key} = {rates!r} is not a list of learning rates")


def _same_shape(saved, live) -> bool:
    """``saved`` (read back from JSON) has the JSON shape of ``live``: numbers for numbers, lists as long."""
    if isinstance(live, bool) or live is None or isinstance(live, str):
        return type(saved) is type(live)
    if isinstance(live, int | float):
        return isinstance(saved, int | float) and not isinstance(saved, bool)
    if isinstance(live, list | tuple):
        return isinstance(saved, list | tuple) and len(saved) == len(live) and \
            all(_same_shape(a, b) for a, b in zip(saved, live, strict=True))
    if isinstance(live, dict):
        return isinstance(saved, dict) and set(saved) == set(live) and all(_same_shape(saved[k], live[k]) for k in live)
    return False  # an object in the live state: never taken from a file


def _check_scheduler_fits(file: Path, saved: dict, live: dict) -> None:
    """Only the scheduler's own fields, each shaped as the scheduler being resumed has it (the scheduler copies
    every key it is given onto itself)."""
    extra = sorted(set(saved) - set(live))
    if extra:
        raise CheckpointError(f"{file} holds fields the scheduler does not have ({', '.join(map(str, extra[:4]))})")
    wrong = [k for k in saved if not _same_shape(saved[k], live[k])]
    if wrong:
        raise CheckpointError(f"{file}: {wrong[0]} is not shaped like the scheduler's own")


def _check_rng(file: Path, rng: dict[str, torch.Tensor]) -> None:
    """Generator states of the size and dtype torch's own have (a wrong one is refused by torch mid-resume)."""
    expected = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        expected.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    if "cpu" not in rng:
        raise CheckpointError(f"{file} holds no CPU generator state")
    for key, value in rng.items():
        like = expected.get(key, expected["cpu"] if not key.startswith("cuda") else None)
        if key != "cpu" and not key.startswith("cuda"):
            raise CheckpointError(f"{file} holds an unknown state {key!r}")
        if like is not None and (value.dtype != like.dtype or value.shape != like.shape):
            raise CheckpointError(f"{file}: the {key} generator state is {value.dtype} {tuple(value.shape)}, torch's "
                                  f"is {like.dtype} {tuple(like.shape)}")


def _read(path: Path, rank: int, expected: int | None = None, steps: int | None = None):
    """Every file of the checkpoint, each read once and checked before anything is loaded into the run."""
    step = step_of(path, expected, steps)
    weights, tensors, rng = (_read_tensors(path / name) for name in (MODEL, OPTIM, _rng_file(rank)))
    meta = _read_json(path / OPTIM_META)
    if not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("state"), dict):
        raise CheckpointError(f"{path / OPTIM_META} lacks the optimizer's param groups")
    sched = _read_json(path / SCHED)
    _check_optimizer(path, meta, tensors, weights)
    _check_scheduler(path, sched, step)
    _check_rng(path / _rng_file(rank), rng)
    return step, weights, tensors, meta, sched, rng


def load(path: Path, model, optimizer, scheduler, rank: int = 0, step: int | None = None,
         steps: int | None = None) -> int:
    """Restore a checkpoint written by :func:`save` into the same (prepared) objects; returns its step (checked
    against ``step``, the number in its name, and ``steps``, the run's length, when given)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    step, weights, tensors, meta, sched, rng = _read(path, rank, step, steps)
    optimizer = getattr(optimizer, "optimizer", optimizer)
    state: dict[str, dict] = {}
    for key, value in [*tensors.items(), *_unjson(meta["state"]).items()]:
        name, _, entry = key.rpartition("//")
        state.setdefault(name, {})[entry] = value
    try:
        set_state_dict(model, optimizer, model_state_dict=weights,
                       optim_state_dict={"state": state, "param_groups": _unjson(meta["param_groups"])},
                       options=_options(model))
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{path} does not fit the model and optimizer being trained "
                              f"({str(err).splitlines()[0][:160]}); it belongs to another run") from None
    _check_scheduler_fits(path / SCHED, _unjson(sched), scheduler.state_dict())
    try:
        scheduler.load_state_dict({**scheduler.state_dict(), **_unjson(sched)})
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / SCHED} does not fit the scheduler ({str(err).splitlines()[0][:120]})") from None
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")] or
                                     torch.cuda.get_rng_state_all())
    return step
