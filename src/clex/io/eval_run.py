"""Where evaluations write: every ``out`` is claimed through :mod:`clex.outdir`.

An evaluation's ``out`` is clex's only if it is missing, empty or holds clex's manifest; results
already there (``results.json`` listed in the manifest) are refused without ``overwrite``, which
removes only the files the manifest lists. Every file is recorded in the manifest before it is written
and written atomically (a temporary name, then a rename), so a kill never leaves an unlisted file.

The CLI checks ``out`` before any work (:class:`EvalOut`: nothing is written for a refused or invalid
command), and claims it — clearing it on ``overwrite`` — only once the arguments are validated, just
before the first model is loaded (the ``ready`` callback of the evaluations).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from clex.io import outdir as O
from clex.jsonfile import JSONFileError, read_json

RESULTS = "results.json"
PARTIAL = "partial.jsonl"  # finished cells of a task evaluation, read back by a re-run


def _source(model) -> str | Path | None:
    return model if isinstance(model, (str, Path)) else None


def _refuse_results(path: Path, kind: str) -> O.OutDirError:
    command = kind.replace("-", " ", 1)
    return O.OutDirError(f"`out` {path} already holds results of clex {command} ({path / RESULTS}); pass "
                         "`overwrite` to replace them (only files clex wrote there are removed) or choose another "
                         "`out`")


def _finished(out: O.OutDir) -> bool:
    """``results.json`` is there as clex wrote it and is not the report of an interrupted run (which the
    same command run again replaces)."""
    if not out.holds(RESULTS):
        return False
    try:
        results = read_json(out.path / RESULTS)
        return not (results.get("complete") is False and results.get("interrupted") is True)
    except JSONFileError:
        return True  # clex wrote it (its hash matches), so it is refused rather than guessed at


def claim_out(path: str | Path, kind: str, overwrite: bool = False, model=None) -> O.OutDir:
    """Claim ``path`` for an evaluation of ``kind`` (``overwrite`` clears what clex wrote there)."""
    out = O.claim(path, kind, overwrite=overwrite, source=_source(model))
    if _finished(out):
        raise _refuse_results(Path(path), kind)
    return out


def preflight(path: str | Path, kind: str, overwrite: bool = False, model=None) -> None:
    """Every refusal :func:`claim_out` would give, without creating or writing anything."""
    path = Path(path)
    if path.is_dir():
        O.check_unlocked(path)  # another clex job writing there: refused at once
    existing = O.claim(path, kind, overwrite=overwrite, source=_source(model), dry_run=True)
    if existing is not None and not overwrite and existing.kind == kind and _finished(existing):
        raise _refuse_results(path, kind)


class EvalOut:
    """An evaluation's ``out`` for the life of one command (a context manager).

    Checked on creation (nothing written); ``ready()`` claims it (and holds its lock) once the command's
    arguments are valid; on failure a directory this command created and left empty is removed again.
    """

    def __init__(self, path: str | Path, kind: str, overwrite: bool = False, model=None,
                 files: tuple[str, ...] = ()) -> None:
        preflight(path, kind, overwrite, model)
        self.path, self.kind, self.overwrite, self.model, self.files = Path(path), kind, overwrite, model, files
        self.created = not self.path.exists()
        self.out: O.OutDir | None = None
        self._stack = contextlib.ExitStack()

    def ready(self) -> O.OutDir:
        if self.out is None:
            out = claim_out(self.path, self.kind, self.overwrite, self.model)
            self._stack.enter_context(O.locked(self.path))
            out.check_free(*self.files)  # refused now, not after the work, if one of them is the user's
            self.out = out
        return self.out

    def __enter__(self) -> EvalOut:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        if exc[0] is not None and self.created and self.out is not None and not self.out.files:
            with contextlib.suppress(O.OutDirError, OSError):  # nothing written: the directory goes again
                self.out.clear()
                if {p.name for p in self.path.iterdir()} <= {O.MANIFEST}:
                    (self.path / O.MANIFEST).unlink()
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
