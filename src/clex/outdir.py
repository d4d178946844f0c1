"""Output directories: what clex may write, replace and remove, and one process at a time.

A directory is clex's to write into only when it is missing, empty, or holds clex's manifest
(``.clex-manifest.json``), the list of the top-level names clex wrote there. A name is recorded
*before* it is written, so a kill mid-write leaves nothing unlisted behind. Everything else in the
directory is the user's: never removed, never replaced (``--overwrite`` removes only what the
manifest lists; a listed directory that holds a manifest of its own is cleaned the same way).

``locked`` holds ``.clex-lock`` (pid and host) for the life of a job, so two jobs never write one
directory; a lock whose process is gone on this host is stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

MANIFEST = ".clex-manifest.json"
LOCK = ".clex-lock"
TMP_PREFIX = ".clex-tmp-"  # clex's own temporary files: removed by --overwrite, never foreign


def _own(name: str) -> bool:
    return name in (MANIFEST, LOCK) or name.startswith(TMP_PREFIX)


class OutDirError(ValueError):
    """An output directory clex may not write into as asked; the message says what to do."""


class OutDir:
    """A claimed output directory and its manifest."""

    def __init__(self, path: Path, kind: str, files: list[str], existed: bool) -> None:
        self.path, self.kind, self._files, self.existed = path, kind, list(files), existed

    # --- the manifest -----------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        return list(self._files)

    def holds(self, name: str) -> bool:
        """True when clex wrote ``name`` here and it still exists."""
        return name in self._files and (self.path / name).exists()

    def add(self, *names: str) -> None:
        """Record names about to be written (call before writing them)."""
        new = [n for n in names if n not in self._files]
        for name in new:
            if "/" in name or name in ("", ".", "..") or _own(name):
                raise ValueError(f"manifest entries are top-level names, got {name!r}")
            if (self.path / name).exists() or (self.path / name).is_symlink():
                raise OutDirError(f"{self.path / name} exists and was not written by clex; it is left alone: move "
                                  "it away or choose another --out")  # fmt: skip
        if new:
            self._files.extend(new)
            self._save()

    def forget(self, *names: str) -> None:
        """Drop names clex removed itself."""
        kept = [n for n in self._files if n not in names]
        if kept != self._files:
            self._files = kept
            self._save()

    def _save(self) -> None:
        tmp = self.path / f"{TMP_PREFIX}manifest-{os.getpid()}"
        tmp.write_text(json.dumps({"kind": self.kind, "files": self._files}, indent=1))
        os.replace(tmp, self.path / MANIFEST)

    # --- writing ----------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> Path:
        """Write a file of ours atomically (a temporary name, then a rename)."""
        self.add(name)
        target = self.path / name
        tmp = self.path / f"{TMP_PREFIX}{name}-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        return target

    def place(self, item: Path, name: str | None = None) -> Path:
        """Move ``item`` (a file or directory clex just wrote elsewhere) into the directory as ``name``."""
        name = name or item.name
        self.add(name)
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            remove(target)
        os.replace(item, target)
        return target

    def remove(self, name: str) -> None:
        """Remove one listed entry (never an unlisted one)."""
        if name not in self._files:
            raise OutDirError(f"{self.path / name} was not written by clex; it is left alone")
        remove(self.path / name)
        self.forget(name)

    def clear(self) -> None:
        """``--overwrite``: remove everything the manifest lists, nothing else."""
        for name in list(self._files):
            remove(self.path / name)
        for item in self.path.glob(TMP_PREFIX + "*"):
            remove(item)
        self._files = []
        self._save()


def fresh_temp_dir(beside: Path) -> Path:
    """A new directory of clex's own next to ``beside`` (to fill, then rename onto it), with the mode a plain
    ``mkdir`` would give (``mkdtemp``'s 0700 would become the output's)."""
    import tempfile

    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{beside.name}-", dir=beside.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def remove(path: Path) -> None:
    """Remove a file or a directory clex wrote; a directory with a manifest of its own loses only what that
    manifest lists (and is removed only if that leaves it empty)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        if (path / MANIFEST).exists():
            read(path).clear()
            with contextlib.suppress(FileNotFoundError):
                (path / MANIFEST).unlink()
            with contextlib.suppress(OSError):
                path.rmdir()
        else:
            shutil.rmtree(path)


def read(path: Path) -> OutDir:
    """The manifest of a directory clex wrote into."""
    try:
        record = json.loads((path / MANIFEST).read_text())
        files, kind = record["files"], record["kind"]
        if not (isinstance(files, list) and all(isinstance(f, str) and "/" not in f for f in files)):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise OutDirError(f"{path / MANIFEST} is not a readable clex manifest; move the directory aside or "
                          "choose another --out") from None  # fmt: skip
    return OutDir(path, str(kind), [f for f in files if not _own(f)], existed=True)


def foreign(path: Path) -> list[str]:
    """Top-level names in ``path`` that clex did not write."""
    if not path.is_dir():
        return []
    listed = set(read(path).files) if (path / MANIFEST).exists() else set()
    return sorted(n.name for n in path.iterdir() if n.name not in listed and not _own(n.name))


def claim(path: str | Path, kind: str, *, overwrite: bool = False, source: str | Path | None = None,
          flag: str = "--out", dry_run: bool = False) -> OutDir | None:  # fmt: skip
    """Make ``path`` clex's output directory for a job of ``kind`` (created if missing).

    Refused: a path that is a file, a directory holding files clex did not write and no manifest, a
    directory of another kind of job (unless ``overwrite``), and an output equal to or inside ``source``
    (the model being read). With ``overwrite`` what the manifest lists is removed first. ``dry_run``
    makes every check and changes nothing (returns the manifest if there is one, else None): run it
    before expensive work, then claim for real.
    """
    path = Path(path)
    if source is not None and Path(source).exists():
        src, dst = Path(source).resolve(), path.resolve()
        if dst == src or src in dst.parents:
            raise OutDirError(f"{flag} {path} is the model directory {source} or inside it; write elsewhere so the "
                              "model is never replaced")  # fmt: skip
    if path.exists() and not path.is_dir():
        raise OutDirError(f"{flag} {path} is a file, not a directory")
    if not path.exists():
        if dry_run:
            return None
        path.mkdir(parents=True)
    if (path / MANIFEST).exists():
        out = read(path)
        if out.kind != kind:
            if not overwrite:
                raise OutDirError(f"{flag} {path} holds clex {out.kind} output, not {kind}; choose another {flag} "
                                  "or pass --overwrite to replace what clex wrote there")  # fmt: skip
            if dry_run:
                return out
            out.kind = kind
        if dry_run:
            return out
        if overwrite:
            out.clear()
            out.existed = False
        return out
    others = foreign(path)
    if others:
        shown = ", ".join(others[:4]) + (", …" if len(others) > 4 else "")
        raise OutDirError(f"{flag} {path} holds files clex did not write ({shown}); choose a new or empty directory "
                          "(clex never replaces or removes files it did not write)")  # fmt: skip
    if dry_run:
        return None
    out = OutDir(path, kind, [], existed=False)
    out._save()
    return out


# --- one job per directory --------------------------------------------------------------------------
def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock: Path) -> dict | None:
    """The live holder of a lock file, or None (no lock, or a stale one)."""
    if not lock.exists():
        return None
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        holder = None
    if not isinstance(holder, dict):
        holder = {"pid": -1, "host": "?"} if time.time() - _mtime(lock) < 10 else None  # being written right now
    return holder if holder is not None and _alive(holder) else None


def _busy(path, lock: Path, holder: dict) -> OutDirError:
    return OutDirError(f"{path} is in use by another clex job (pid {holder.get('pid')} on {holder.get('host')}); "
                       f"wait for it to finish, or remove {lock} if that job is gone")  # fmt: skip


def check_unlocked(path: str | Path) -> None:
    """Refuse at once when a live job holds ``path``'s lock (before any other check or work)."""
    lock = Path(path) / LOCK
    holder = _holder(lock)
    if holder is not None:
        raise _busy(path, lock, holder)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold ``path/.clex-lock`` for the duration; refuse when a live process holds it."""
    lock = Path(path) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None:
                raise _busy(path, lock, holder) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise OutDirError(f"could not take the lock {lock}; remove it if no clex job is running there")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
