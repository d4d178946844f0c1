"""Resuming a task evaluation: finished cells go to ``partial.jsonl`` as they complete, each stamped with the
run's key (everything that can change a score), and a re-run with the same key skips them; a file from other
settings is refused, never mixed in."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clex import data as D
from clex.io.fingerprint import model_fingerprint
from clex.jsonfile import JSONFileError, loads

if TYPE_CHECKING:
    from clex.eval.tasks import Sample, TaskRow


def run_key(kind: str, model, tokenizer, samples: Sequence[Sample], cache_mode: str, batch_size: int,
            dtype: torch.dtype, device: str) -> dict:
    """Everything that can change a cell's score, except the method (each cell records its own): the
    prompts and what is scored (ids, answers, budgets, stop strings, metric, scorer extras), the weights'
    content (:func:`clex.io.fingerprint.model_fingerprint`), the tokenizer (name and a hash of its vocabulary
    and rules), the cache mode (stored as ``policy``), dtype, device, batch size (batched kernels may round
    differently) and the versions of clex, torch and transformers."""
    import hashlib

    import transformers

    from clex import __version__

    prompts = hashlib.sha256(kind.encode())
    for s in samples:
        prompts.update(json.dumps([s.ids, s.answers, s.max_new_tokens, s.task, s.length, s.depth, s.metric,
                                   list(s.stop_strings), s.extra], sort_keys=True, default=str).encode())
    return {
        "kind": kind, "prompts": prompts.hexdigest()[:16], "weights": model_fingerprint(model),
        "tokenizer": f"{getattr(tokenizer, 'name_or_path', None) or getattr(tokenizer, 'name', '?')} "
                     f"{D.tokenizer_fingerprint(tokenizer)}",
        "policy": cache_mode, "dtype": str(dtype).replace("torch.", ""), "device": device, "batch_size": batch_size,
        "versions": f"clex {__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
    }


def _row(value: object) -> TaskRow | None:
    """A finished cell's row read back, if every field has its type (and the score is in [0, 1])."""
    from clex.eval.tasks import TaskRow

    names = {f.name for f in fields(TaskRow)}
    if not isinstance(value, dict) or set(value) != names:
        return None
    number = (int, float)
    kinds = {"method": str, "task": str, "length": int, "metric": str, "score": number, "samples": int,
             "prompt_tokens": number, "seconds": number, "depth": (*number, type(None))}
    if any(isinstance(value[k], bool) or not isinstance(value[k], t) for k, t in kinds.items()):
        return None
    if not (math.isfinite(value["score"]) and 0 <= value["score"] <= 1):
        return None
    return TaskRow(**value)


class Checkpoint:
    """Finished cells in a JSONL file, each line stamped with the run's key (:func:`run_key`) and its hash.
    A file holding cells of another key is refused; a line cut by a kill is ignored."""

    def __init__(self, path: str | Path | None, key: dict, claimed: object = None):
        import hashlib

        from clex.io.outdir import OutDir

        self.path = Path(path) if path is not None else None
        # in a claimed --out the file is an append-only entry of its manifest (recorded as it grows)
        inside = isinstance(claimed, OutDir) and self.path is not None and self.path.parent == claimed.path
        self.out = claimed if inside else None
        self.key = key
        self.fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.cells: dict[tuple, tuple[TaskRow, list[dict]]] = {}
        if self.path is None or not self.path.exists():
            return
        if self.out is not None:
            self.out.check_free(self.path.name)  # a file clex did not write there is never read as cells
        data = self.path.read_bytes()
        if self.out is not None:  # only what clex recorded: a tail after it is an append cut by a kill
            data = data[: self.out.entries[self.path.name]["size"]]
        for no, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                entry = loads(line, f"{self.path}:{no}", expect=dict)
            except JSONFileError:  # a line cut by a kill
                continue
            if entry.get("fingerprint") != self.fingerprint:
                old = entry.get("key") if isinstance(entry.get("key"), dict) else {}
                changed = [k for k in key if old.get(k) != key[k]] or ["written by another clex version"]
                shown = "; ".join(f"{k}: {old[k]} → {key[k]}" if k in old else k for k in changed)
                raise D.DataError(f"{self.path} holds finished cells of an evaluation with other settings ({shown}); "
                                  "pass `overwrite` to discard them (or delete the file), or choose another `out`")
            row, predictions = _row(entry.get("row")), entry.get("predictions")
            if row is None or not (isinstance(predictions, list) and all(isinstance(p, dict) for p in predictions)):
                continue  # not a cell of ours: ignored, like a cut line
            self.cells[(row.method, row.task, row.length, row.depth)] = (row, predictions)

    def has(self, spec: str, cell: tuple) -> bool:
        return (spec, *cell) in self.cells

    def get(self, spec: str, cell: tuple) -> tuple[TaskRow, list[dict]]:
        return self.cells[(spec, *cell)]

    def add(self, spec: str, cell: tuple, row: TaskRow, predictions: list[dict]) -> None:
        self.cells[(spec, *cell)] = (row, predictions)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.out is not None:
            self.out.open_log(self.path.name)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint, "key": self.key, "row": asdict(row),
                                "predictions": predictions}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.out is not None:
            self.out.note(self.path.name)
