"""The output directory of a ``clex train`` run: its identity, its lock, its checkpoints, its final model.

A run is identified by every argument that changes what is trained (all of ``TrainConfig`` but the
output options below), the number of processes, and fingerprints of the model and of the packed data.
``resume`` continues a run only under the same identity; a finished run is left as it is. The
directory is claimed through :mod:`clex.outdir` (only what clex wrote is ever replaced or removed) and
locked for the life of the run. Checkpoints are :mod:`clex.checkpoint` directories written under a
temporary name and renamed; a damaged latest checkpoint is reported and an earlier intact one used.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from clex.errors import BadInput
from clex.io import checkpoint as C
from clex.io import outdir
from clex.io import records as R
from clex.io.fingerprint import model_fingerprint
from clex.jsonfile import JSONFileError, loads, read_json

STATE_FILE = C.STATE_FILE
ARGS_FILE = "train_args.json"
METRICS_FILE = "metrics.jsonl"
CHAT_STATS_FILE = "chat_data.json"
KIND = "train"
# Options that change where and how often a run writes, not what it trains: free to change on --resume.
NOT_IDENTITY = ("out", "save_every", "keep", "resume", "overwrite", "show_progress", "gradient_checkpointing")


TrainError = BadInput  # the name training code raises


RunError = TrainError  # an output directory or resume request that cannot be honoured


def run_identity(cfg, samples: np.ndarray, processes: int) -> dict:
    """Everything that decides what a run trains."""
    ident = {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}
    ident["processes"] = processes
    ident["model_fingerprint"] = model_fingerprint(cfg.model)
    ident["data_fingerprint"] = hashlib.sha256(np.ascontiguousarray(samples).tobytes()).hexdigest()[:16]
    return ident


def _previous(out: Path) -> dict:
    try:
        ident = read_json(out / ARGS_FILE).get("identity")
        if not isinstance(ident, dict):
            raise JSONFileError("no identity")
        return ident
    except (OSError, JSONFileError):
        raise RunError(f"{out / ARGS_FILE} is missing or damaged, so the run cannot be resumed as the same run; "
                       "start a new `out` (or `overwrite`)") from None


def _changed(previous: dict, current: dict, keys) -> list[str]:
    return [k for k in keys if previous.get(k) != current.get(k)]


def _describe(previous: dict, current: dict, keys: list[str]) -> str:
    shown = []
    for k in keys:
        if k.endswith("_fingerprint"):
            shown.append(f"the {k.removesuffix('_fingerprint')}'s content")
        elif k == "processes":
            shown.append(f"the number of processes ({previous.get(k)} → {current.get(k)})")
        else:
            shown.append(f"`{k}` ({previous.get(k)!r} → {current.get(k)!r})")
    return ", ".join(shown)


def _manifest(out: Path) -> outdir.OutDir | None:
    try:
        return outdir.read(out)
    except outdir.OutDirError:
        return None


def finished(out: Path, steps: int | None = None) -> bool:
    """True only for a run whose final state and final model clex wrote and that are still as written: the
    state says ``"final": true`` at its last step (``steps`` when given)."""
    run = _manifest(out)
    if run is None or not run.holds(STATE_FILE) or not run.holds("config.json"):
        return False
    try:
        state = read_json(out / STATE_FILE)
    except (OSError, JSONFileError):
        return False
    step = state.get("step")
    return state.get("final") is True and type(step) is int and step >= 1 and steps in (None, step)


def preflight(out: Path, cfg) -> bool:
    """Every refusal that needs no model or data, before anything is written. True: the run in ``out`` is
    finished under these settings (nothing to do)."""
    if cfg.resume and cfg.overwrite:
        raise RunError("`resume` continues the run in `out` and `overwrite` replaces it: pass one of them")
    outdir.check_unlocked(out)
    if out.is_dir() and not (out / outdir.MANIFEST).exists() and (out / ARGS_FILE).exists():
        raise RunError(f"{out} holds a run from an older clex without a manifest (its checkpoints are pickles, "
                       "which clex no longer reads); move it aside or choose a new `out`")
    existing = outdir.claim(out, KIND, overwrite=cfg.overwrite and not cfg.resume, source=cfg.model, dry_run=True)
    holds_run = existing is not None and existing.kind == KIND and existing.holds(ARGS_FILE)
    if existing is not None and ARGS_FILE in existing.entries and not holds_run and not cfg.overwrite:
        raise RunError(f"{out / ARGS_FILE} was changed since clex wrote it, so {out} cannot be continued as the "
                       "same run; it is left alone: start a new `out`")
    if cfg.resume:
        if not holds_run:
            raise RunError(f"`resume`: {out} holds no run to resume")
        previous = _previous(out)
        current = {k: v for k, v in asdict(cfg).items() if k not in NOT_IDENTITY}
        _refuse_changes(out, previous, current)
        if finished(out, cfg.steps):
            return True
        existing.check_free(STATE_FILE, METRICS_FILE)  # written again by the run: never over a file of the user's
        return False
    if holds_run and not cfg.overwrite:
        what = "a finished training run" if finished(out) else "a training run"
        raise RunError(f"{out} already holds {what}; pass `resume` to continue it or `overwrite` to replace it")
    return False


def check_identity(out: Path, identity: dict) -> None:
    """`resume`: the model, the data and the process count must be those of the run too."""
    _refuse_changes(out, _previous(out), identity)


def _refuse_changes(out: Path, previous: dict, current: dict) -> None:
    changed = _changed(previous, current, list(current))
    if changed:
        raise RunError(f"`resume` with other settings than the run in {out}: {_describe(previous, current, changed)}"
                       "; a resume continues the same run (start a new `out` for new settings)")


def checkpoints(out: Path) -> list[Path]:
    """The checkpoints clex recorded in ``out``'s manifest and that are there, oldest first (a directory named
    like one that clex did not record is not believed)."""
    run = _manifest(out)
    names = [n for n, r in run.entries.items() if r["type"] == "dir"] if run is not None else []
    return sorted(out / n for n in names if n.startswith("checkpoint-") and _checkpoint_step(out / n) >= 0 and
                  (out / n).is_dir())


def _checkpoint_step(path: Path) -> int:
    digits = path.name.removeprefix("checkpoint-")
    return int(digits) if digits.isascii() and digits.isdigit() else -1  # "²".isdigit(), yet no int


def warn(text: str) -> None:
    print(f"clex train: warning: {text}", file=sys.stderr, flush=True)


class Run:
    """The claimed, locked output directory of one run (its manifest on the main process)."""

    def __init__(self, path: Path, accelerator, model, optimizer, scheduler) -> None:
        self.path, self.accelerator = path, accelerator
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.dir: outdir.OutDir | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @contextlib.contextmanager
    def claimed(self, cfg):
        stack = contextlib.ExitStack()
        with stack:
            if self.main:
                self.dir = outdir.claim(self.path, KIND, overwrite=cfg.overwrite, source=cfg.model)
                stack.enter_context(outdir.locked(self.path))
                if not cfg.resume:
                    self.dir.clear()  # --overwrite, or leftovers of a run killed before it wrote its arguments
            self.accelerator.wait_for_everyone()
            yield self

    def resume(self, steps: int) -> int:
        """Load the latest intact checkpoint (an earlier one when the latest is damaged); its step, or 0. A
        checkpoint is intact when it is as clex recorded it, its step is its name's, and every state in it
        passes :mod:`clex.checkpoint`'s checks."""
        rank = self.accelerator.process_index
        run = outdir.read(self.path)
        for path in reversed(checkpoints(self.path)):
            try:
                changed = R.first_difference(path, run.entries[path.name])
                if changed is not None:
                    raise C.CheckpointError(f"{changed} was changed since clex wrote it")
                return C.load(path, self.model, self.optimizer, self.scheduler, rank,
                              step=_checkpoint_step(path), steps=steps)
            except C.CheckpointError as err:
                if self.main:
                    warn(f"{err}; {path.name} is damaged and left as it is (no longer counted as clex's), trying an "
                         "earlier checkpoint")
                    self.dir.forget(path.name)
        damaged = [p for p in self.path.glob("checkpoint-*") if p.is_dir()]
        if damaged and self.main:
            warn("no intact checkpoint: the run starts again from step 0 (the same steps)")
        return 0

    def save_checkpoint(self, step: int, keep: int) -> None:
        """Written under a temporary name, then renamed: a kill leaves the previous checkpoint intact."""
        name = f"checkpoint-{step:07d}"
        tmp = self.path / f"{outdir.TMP_PREFIX}{name}"
        if R.present(self.path / name) and not outdir.read(self.path).holds(name):
            if self.main:
                warn(f"{self.path / name} is not as clex wrote it; it is kept, and step {step}'s checkpoint is not "
                     "written")
            return
        if self.main:
            self.dir.temp(name, directory=True)
        self.accelerator.wait_for_everyone()
        C.save(tmp, self.model, self.optimizer, self.scheduler, step, self.accelerator.process_index, self.main)
        self.accelerator.wait_for_everyone()
        if self.main:
            self.dir.place(tmp, name)
            self.dir.note(METRICS_FILE)
            for old in checkpoints(self.path)[:-keep]:
                if self.dir.holds(old.name):
                    self.dir.remove(old.name)
                else:
                    warn(f"{old} was changed since clex wrote it; it is kept")
        self.accelerator.wait_for_everyone()


def trim_metrics(run: outdir.OutDir, step: int) -> None:
    """Drop metric lines past the checkpoint being resumed (steps that will run again) and any torn line."""
    path = run.open_log(METRICS_FILE)
    kept = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = loads(line, f"{path}:{number}", expect=dict)  # bounded: a nested line is refused, not recursed
            keep = type(record["step"]) is int and record["step"] <= step
        except (JSONFileError, KeyError):
            warn(f"{path}:{number} is not a metrics record (a line torn by a kill?); dropped")
            continue
        if keep:
            kept.append(line)
    run.write_text(METRICS_FILE, "".join(line + "\n" for line in kept), log=True)
