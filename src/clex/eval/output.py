"""Where evaluations write: every ``--out`` is claimed through :mod:`clex.outdir`.

An evaluation's ``--out`` is clex's only if it is missing, empty or holds clex's manifest; results
already there (``results.json`` listed in the manifest) are refused without ``--overwrite``, which
removes only the files the manifest lists. Every file is recorded in the manifest before it is written
and written atomically (a temporary name, then a rename), so a kill never leaves an unlisted file.

The CLI checks ``--out`` before any work (:class:`EvalOut`: nothing is written for a refused or invalid
command), and claims it — clearing it on ``--overwrite`` — only once the arguments are validated, just
before the first model is loaded (the ``ready`` callback of the evaluations).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from .. import outdir as O

RESULTS = "results.json"
PARTIAL = "partial.jsonl"  # finished cells of a task evaluation, read back by a re-run


def _source(model) -> str | Path | None:
    return model if isinstance(model, (str, Path)) else None


def _refuse_results(path: Path, kind: str) -> O.OutDirError:
    command = kind.replace("-", " ", 1)
    return O.OutDirError(f"--out {path} already holds results of clex {command} ({path / RESULTS}); pass "
                         "--overwrite to replace them (only files clex wrote there are removed) or choose another "
                         "--out")  # fmt: skip


def claim_out(path: str | Path, kind: str, overwrite: bool = False, model=None) -> O.OutDir:
    """Claim ``path`` for an evaluation of ``kind`` (``--overwrite`` clears what clex wrote there)."""
    out = O.claim(path, kind, overwrite=overwrite, source=_source(model))
    if out.holds(RESULTS):
        raise _refuse_results(Path(path), kind)
    return out


def precheck(path: str | Path, kind: str, overwrite: bool = False, model=None) -> None:
    """Every refusal :func:`claim_out` would give, without creating or writing anything."""
    path = Path(path)
    if path.is_dir():
        O.check_unlocked(path)  # another clex job writing there: refused at once
    existing = O.claim(path, kind, overwrite=overwrite, source=_source(model), dry_run=True)
    if existing is not None and not overwrite and existing.kind == kind and existing.holds(RESULTS):
        raise _refuse_results(path, kind)


class EvalOut:
    """An evaluation's ``--out`` for the life of one command (a context manager).

    Checked on creation (nothing written); ``ready()`` claims it (and holds its lock) once the command's
    arguments are valid; on failure a directory this command created and left empty is removed again.
    """

    def __init__(self, path: str | Path, kind: str, overwrite: bool = False, model=None,
                 files: tuple[str, ...] = ()) -> None:  # fmt: skip
        precheck(path, kind, overwrite, model)
        self.path, self.kind, self.overwrite, self.model, self.files = Path(path), kind, overwrite, model, files
        self.created = not self.path.exists()
        self.out: O.OutDir | None = None
        self._stack = contextlib.ExitStack()

    def ready(self) -> O.OutDir:
        if self.out is None:
            out = claim_out(self.path, self.kind, self.overwrite, self.model)
            self._stack.enter_context(O.locked(self.path))
            out.add(*self.files)  # recorded before anything writes them
            self.out = out
        return self.out

    def __enter__(self) -> EvalOut:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        if exc[0] is not None and self.created and self.path.is_dir():
            if all(O._own(p.name) for p in self.path.iterdir()):  # nothing of ours beyond the record itself
                for p in self.path.iterdir():
                    O.remove(p) if p.name != O.MANIFEST else p.unlink()
                with contextlib.suppress(OSError):
                    self.path.rmdir()


def as_outdir(out: str | Path | O.OutDir, kind: str) -> O.OutDir:
    """``out`` itself, or the directory at that path claimed for ``kind`` (the Python API: clex's earlier
    results there are replaced, anything else is refused)."""
    if isinstance(out, O.OutDir):
        return out
    claimed = O.claim(out, kind)
    if claimed.files:
        claimed.clear()
    return claimed


def write_file(out: O.OutDir, name: str, write: Callable[[Path], None]) -> Path:
    """Record ``name``, let ``write`` write it under a temporary name, then rename it into place."""
    out.add(name)
    tmp = out.path / f"{O.TMP_PREFIX}{os.getpid()}-{name}"
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.place(tmp, name)
