"""Output directories: what clex may write, replace and remove, and one process at a time.

A directory is clex's to write into only when it is missing, empty, or holds clex's manifest
(``.clex-manifest.json``). The manifest records *what* clex wrote under each top-level name, not only
the name (:mod:`clex.records`): a file's size and SHA-256, an append-only log's recorded prefix, a
directory's whole tree, a nested output directory (checked through its own manifest), a link as a
link, a temporary by its inode. Everything else is the user's.

clex replaces or removes a recorded entry only while what is there still matches its record; an entry
that was changed, swapped for a link, or that a forged manifest names is kept, and the command refuses in
one line naming it before anything is removed. Names are single path components, so nothing outside the
directory can be named, and removal never follows a link (a link is unlinked, not its target).

Every write goes to a temporary name first, is recorded (with the record it replaces, for the instant
before the rename), then renamed into place: a kill at any moment leaves each entry matching a record.

``locked`` holds ``.clex-lock`` (pid and host) for the life of a job, so two jobs never write one
directory; a lock whose process is gone on this host is stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

from clex.errors import OutDirError
from clex.io import records as R
from clex.io.atomic import TMP_PREFIX, atomic_dir, atomic_write
from clex.io.lock import LOCK, check_unlocked, locked  # noqa: F401 (part of this module's interface)
from clex.jsonfile import JSONFileError, read_json

MANIFEST = ".clex-manifest.json"
VERSION = 2
MAX_MANIFEST_BYTES = 8 << 20


def _own(name: str) -> bool:
    return name in (MANIFEST, LOCK) or name.startswith(TMP_PREFIX)


class OutDir:
    """A claimed output directory and its manifest (name → record of what clex wrote there)."""

    def __init__(self, path: Path, kind: str, entries: dict[str, dict], existed: bool) -> None:
        self.path, self.kind, self.entries, self.existed = Path(path), kind, dict(entries), existed

    # --- what is recorded -------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        """The recorded names (temporaries aside)."""
        self._reload()
        return [n for n, r in self.entries.items() if r["type"] != "tmp"]

    def holds(self, name: str) -> bool:
        """True when clex wrote ``name`` here and it is there as clex wrote it."""
        self._reload()
        record = self.entries.get(name)
        return record is not None and record["type"] != "tmp" and R.present(self.path / name) and \
            R.matches(self.path / name, record)

    def check_free(self, *names: str) -> None:
        """Refuse at once when a name clex is going to write is taken by something it did not write."""
        self._reload()
        for name in names:
            R.check_name(name)
            if R.present(self.path / name) and not self._ours(name):
                raise self._not_ours(name)

    def _ours(self, name: str) -> bool:
        record = self.entries.get(name)
        return record is not None and R.matches(self.path / name, record)

    def _not_ours(self, name: str) -> OutDirError:
        what = "was changed since clex wrote it" if name in self.entries else "was not written by clex"
        return OutDirError(f"{self.path / name} {what}; it is left alone: move it away or choose another "
                           "directory")

    def _reload(self) -> None:
        """Take up what another handle on this directory recorded since (the demo holds several; one
        process writes at a time, under the lock), so that a save never drops another's entries."""
        if self.existed or (self.path / MANIFEST).exists():
            with contextlib.suppress(FileNotFoundError):
                self.entries = read(self.path).entries

    def _save(self) -> None:
        text = json.dumps({"clex_manifest": VERSION, "kind": self.kind, "entries": self.entries}, indent=1)
        atomic_write(self.path / MANIFEST, lambda tmp: tmp.write_text(text))

    # --- writing ----------------------------------------------------------------------------------
    def temp(self, name: str, directory: bool = False) -> Path:
        """A new temporary of clex's in this directory named ``.clex-tmp-<name>`` (recorded, so ``overwrite``
        may remove it; one left by a killed job under the same name is removed first)."""
        self._reload()
        tmp = self.path / f"{TMP_PREFIX}{name}"
        if R.present(tmp) and not _empty_leftover(tmp, directory):
            self._drop_temp(tmp.name)  # clex's own, left by a killed job; anything else is refused
        if not R.present(tmp):
            tmp.mkdir() if directory else tmp.touch()
        self.entries[tmp.name] = R.temp_record(tmp)
        self._save()
        return tmp

    def _drop_temp(self, name: str) -> None:
        record = self.entries.get(name)
        if record is None or record["type"] != "tmp" or not R.matches(self.path / name, record):
            raise self._not_ours(name)
        R.remove(self.path, name, record)
        del self.entries[name]

    def write(self, name: str, fill: Callable[[Path], None], log: bool = False) -> Path:
        """Write a file of ours atomically: ``fill`` writes a recorded temporary, which is recorded and renamed
        into place; ``log``: an append-only file whose recorded prefix later appends keep."""
        self.check_free(name)
        tmp = self.temp(f"{os.getpid()}-{name}")  # the suffix kept: matplotlib reads the format from it
        try:
            fill(tmp)
        except BaseException:
            with contextlib.suppress(OutDirError, OSError):  # best effort: the failure itself is what to report
                self._drop_temp(tmp.name)
                self._save()
            raise
        return self.place(tmp, name, log=log)

    def write_text(self, name: str, text: str, log: bool = False) -> Path:
        return self.write(name, lambda tmp: tmp.write_text(text, encoding="utf-8"), log=log)

    def place(self, item: Path, name: str | None = None, log: bool = False) -> Path:
        """Move ``item`` (a file or directory clex just wrote: a temporary of this directory, or one inside
        it) into the directory as ``name``, replacing only a recorded entry that still matches its record."""
        self._reload()
        name = name or item.name
        self.check_free(name)
        target = self.path / name
        record = R.record_of(item, log=log)
        previous = R.current(target, self.entries[name]) if R.present(target) else None
        self.entries[name] = {**record, "was": previous} if previous else record
        self._save()
        if previous is not None and (record["type"] == "dir" or (target.is_dir() and not target.is_symlink())):
            R.remove(self.path, name, previous)  # a rename replaces a file or a link, not a directory
        os.replace(item, target)
        self.entries[name] = record
        self.entries.pop(item.name, None) if item.parent == self.path else None
        self._save()
        return target

    def open_log(self, name: str) -> Path:
        """An append-only file of ours (created empty and recorded when missing); :meth:`note` records what
        has been appended so far."""
        self._reload()
        if name not in self.entries or not R.present(self.path / name):
            self.write_text(name, "", log=True)
        elif not self._ours(name):
            raise self._not_ours(name)
        return self.path / name

    def note(self, name: str) -> None:
        """Record the current content of an append-only file of ours."""
        self._reload()
        if self._ours(name):
            self.entries[name] = R.record_of(self.path / name, log=True)
            self._save()

    def sub(self, name: str, kind: str) -> OutDir:
        """A nested output directory with a manifest of its own, recorded here as one."""
        self._reload()
        self.check_free(name)
        if name not in self.entries:
            self.entries[name] = {"type": "outdir"}
            self._save()
        return claim(self.path / name, kind)

    # --- removing ---------------------------------------------------------------------------------
    def forget(self, name: str) -> None:
        """Stop counting ``name`` as clex's (an entry found damaged: kept as it is, never removed later)."""
        self._reload()
        if self.entries.pop(name, None) is not None:
            self._save()

    def changed(self) -> list[str]:
        """Recorded entries that no longer match their record (kept by every removal)."""
        self._reload()
        return [n for n, r in self.entries.items() if R.present(self.path / n) and not R.matches(self.path / n, r)]

    def remove(self, name: str) -> None:
        """Remove one recorded entry that still matches its record; anything else is refused and kept."""
        self._reload()
        if not self._ours(name):
            raise self._not_ours(name)
        if R.present(self.path / name):
            R.remove(self.path, name, self.entries[name])
        if not R.present(self.path / name):
            del self.entries[name]
        self._save()

    def clear(self) -> None:
        """``overwrite``: remove every recorded entry, and nothing else. Refused before anything is removed
        when one of them no longer matches its record."""
        self.check_clear()
        self._remove_recorded()

    def check_clear(self) -> None:
        """The refusal :meth:`clear` would give, removing nothing."""
        changed = self.changed()
        if changed:
            shown = ", ".join(changed[:4]) + (", …" if len(changed) > 4 else "")
            raise OutDirError(f"{self.path} holds entries that were changed since clex wrote them or that clex did "
                              f"not write ({shown}); they are kept and nothing was removed: move them away, or "
                              "choose another directory")

    def _remove_recorded(self) -> None:
        kept = {}
        for name, record in self.entries.items():
            if R.present(self.path / name):
                R.remove(self.path, name, record)
            if R.present(self.path / name):  # a nested directory that holds more than clex recorded
                kept[name] = record
        self.entries = kept
        self._save()


def _empty_leftover(tmp: Path, directory: bool) -> bool:
    """An empty directory (or file) under a temporary's name: what a kill between creating a temporary and
    recording it leaves. It holds nothing to lose, so it is taken as the new temporary."""
    info = os.lstat(tmp)
    if directory:
        return stat.S_ISDIR(info.st_mode) and not os.listdir(tmp)
    return stat.S_ISREG(info.st_mode) and info.st_size == 0 and info.st_nlink == 1  # a hard link is someone's


def nest(parent: Path, name: str, kind: str) -> Path:
    """``parent/name`` as a nested output directory, recorded in ``parent``'s manifest when it has one (a
    directory of runs inside a demo; elsewhere it is simply claimed)."""
    parent = Path(parent)
    if (parent / MANIFEST).exists():
        read(parent).sub(name, kind)
    else:
        claim(parent / name, kind)
    return parent / name


def write_in(path: Path, fill: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically, recorded in its directory's manifest when it has one."""
    path = Path(path)
    if (path.parent / MANIFEST).exists():
        return read(path.parent).write(path.name, fill)
    return atomic_write(path, fill)


def place_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """Write directory ``path`` whole (``fill`` fills a temporary), recorded in its parent's manifest when the
    parent has one."""
    path = Path(path)
    if (path.parent / MANIFEST).exists():
        parent = read(path.parent)
        tmp = parent.temp(path.name, directory=True)
        fill(tmp)
        return parent.place(tmp, path.name)
    return atomic_dir(path, fill)


def seal(path: Path, kind: str) -> OutDir:
    """Record everything now in ``path`` (a directory clex just filled, not yet renamed into place) as
    clex's, so that it is recognised, and verified, when it is opened again."""
    out = OutDir(path, kind, {}, existed=False)
    for item in sorted(path.iterdir()):
        if not _own(item.name):
            out.entries[item.name] = R.record_of(item)
    out._save()
    return out


def read(path: Path) -> OutDir:
    """The manifest of a directory clex wrote into, checked entry by entry."""
    file = Path(path) / MANIFEST
    try:
        if file.is_symlink():
            raise R.RecordError("it is a link; clex writes its manifest as a plain file")
        record = read_json(file, max_bytes=MAX_MANIFEST_BYTES)
        if record.get("clex_manifest") != VERSION:
            raise OutDirError(f"{file} was written by an older clex (it names files without recording their "
                              "content, so clex cannot tell them from yours); move the directory aside or choose "
                              "another directory")
        kind, entries = record.get("kind"), record.get("entries")
        if not isinstance(kind, str) or not isinstance(entries, dict):
            raise R.RecordError("lacks its kind or its entries")
        for name, entry in entries.items():
            R.check_record(name, entry)
    except (JSONFileError, R.RecordError) as err:
        why = str(err).replace(str(file), "").strip(" :")
        raise OutDirError(f"{file} is not a clex manifest ({why}); nothing there is removed: move the directory "
                          "aside or choose another directory") from None
    except FileNotFoundError:
        raise OutDirError(f"{file} is missing") from None
    return OutDir(path, kind, entries, existed=True)


def foreign(path: Path) -> list[str]:
    """Top-level names in ``path`` that clex did not write."""
    if not path.is_dir():
        return []
    listed = set(read(path).entries) if (path / MANIFEST).exists() else set()
    return sorted(n.name for n in path.iterdir() if n.name not in listed and not _own(n.name))


def check_outside(path: str | Path, source: str | Path | None, flag: str = "`out`") -> None:
    """Refuse an output that is the model directory ``source`` being read, or inside it."""
    if source is not None and Path(source).exists():
        src, dst = Path(source).resolve(), Path(path).resolve()
        if dst == src or src in dst.parents:
            raise OutDirError(f"{flag} {path} is the model directory {source} or inside it; write elsewhere so the "
                              "model is never replaced")


def claim(path: str | Path, kind: str, *, overwrite: bool = False, source: str | Path | None = None,
          flag: str = "`out`", dry_run: bool = False) -> OutDir | None:
    """Make ``path`` clex's output directory for a job of ``kind`` (created if missing).

    Refused: a path that is a file, a directory holding files clex did not write and no manifest, a
    directory of another kind of job (unless ``overwrite``), an output equal to or inside ``source``
    (the model being read), and with ``overwrite`` a recorded entry that no longer matches its record.
    With ``overwrite`` what the manifest records is removed first. ``dry_run`` makes every check and
    changes nothing (returns the manifest if there is one, else None): run it before expensive work,
    then claim for real.
    """
    path = Path(path)
    check_outside(path, source, flag)
    if path.is_symlink() and not path.exists():
        raise OutDirError(f"{flag} {path} is a link to nothing")
    if path.exists() and not path.is_dir():
        raise OutDirError(f"{flag} {path} is a file, not a directory")
    if not path.exists():
        if dry_run:
            return None
        path.mkdir(parents=True)
    if (path / MANIFEST).exists() or (path / MANIFEST).is_symlink():
        out = read(path)
        if out.kind != kind and not overwrite:
            raise OutDirError(f"{flag} {path} holds clex {out.kind} output, not {kind}; choose another {flag} "
                              "or pass `overwrite` to replace what clex wrote there")
        if overwrite:
            out.check_clear()  # every recorded entry checked once, before anything is removed
        if dry_run:
            return out
        out.kind = kind
        if overwrite:
            out._remove_recorded()
            out.existed = False
        return out
    others = foreign(path)
    if others:
        shown = ", ".join(others[:4]) + (", …" if len(others) > 4 else "")
        raise OutDirError(f"{flag} {path} holds files clex did not write ({shown}); choose a new or empty directory "
                          "(clex never replaces or removes files it did not write)")
    if dry_run:
        return None
    out = OutDir(path, kind, {}, existed=False)
    out._save()
    return out
