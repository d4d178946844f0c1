"""What clex wrote under one name, recorded so that it can be recognised later, and removed only then.

A record is a small JSON object (the entries of an output directory's manifest):

    {"type": "file", "size": N, "sha256": H}      a file, byte for byte
    {"type": "log", "size": N, "sha256": H, "ino": I}
                                                  an append-only file: its first N bytes hash to H (with
                                                  nothing recorded yet, the same file: inode I)
    {"type": "dir", "entries": {name: record}}    a directory written whole (a checkpoint): exactly these
    {"type": "outdir"}                            a directory with a manifest of its own, checked through it
    {"type": "link", "target": T}                 a symbolic link, as a link (never followed)
    {"type": "tmp", "ino": I}                     a temporary of clex's, by its inode

Any record may carry ``"was"``: the record it replaces, for the instant between recording a new
version and renaming it into place (a kill there leaves the old version, which must still match).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from clex.errors import DamagedFile
from clex.io.atomic import TMP_PREFIX

TYPES = ("file", "log", "dir", "outdir", "link", "tmp")


RecordError = DamagedFile  # a manifest entry that is not a record clex writes


def check_name(name: object) -> str:
    """A single plain path component (so a record can never name anything outside its directory)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name:
        raise RecordError(f"{name!r} is not a plain file name")
    try:
        if len(os.fsencode(name)) > 255:  # the name's bytes on disk (undecodable bytes kept as surrogates)
            raise RecordError(f"{name[:40]!r}… is longer than a file name can be")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte: no file on disk has this name
        raise RecordError(f"{name!r} is not a plain file name") from None
    if "/" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        raise RecordError(f"{name!r} is not a plain file name")
    return name


def check_record(name: object, record: object, depth: int = 0) -> None:
    """Refuse an entry that is not exactly a record clex writes (names, types, fields)."""
    check_name(name)
    if not isinstance(record, dict) or record.get("type") not in TYPES or depth > 16:
        raise RecordError(f"the entry {name!r} is not a record")
    kind = record["type"]
    fields = {"file": {"size", "sha256"}, "log": {"size", "sha256"}, "dir": {"entries"}, "outdir": set(),
              "link": {"target"}, "tmp": {"ino"}}[kind]
    optional = {"ino"} if kind == "log" else set()
    if not fields <= set(record) - {"type", "was"} <= fields | optional:
        raise RecordError(f"the entry {name!r} has fields {sorted(record)}")
    if kind == "log" and "ino" in record and type(record["ino"]) is not int:
        raise RecordError(f"the entry {name!r} has no valid inode")
    if kind in ("file", "log"):
        size, digest = record["size"], record["sha256"]
        if type(size) is not int or size < 0 or not (isinstance(digest, str) and len(digest) == 64):
            raise RecordError(f"the entry {name!r} has no valid size and hash")
    elif kind == "tmp":
        if type(record["ino"]) is not int or not str(name).startswith(TMP_PREFIX):
            raise RecordError(f"the entry {name!r} is not a temporary of clex's")
    elif kind == "link" and not isinstance(record["target"], str):
        raise RecordError(f"the entry {name!r} has no link target")
    elif kind == "dir":
        if not isinstance(record["entries"], dict):
            raise RecordError(f"the entry {name!r} lists no entries")
        for child, entry in record["entries"].items():
            check_record(child, entry, depth + 1)
    if record.get("was") is not None:  # one version back, and only for a manifest's own entries (as clex writes)
        if depth > 0:
            raise RecordError(f"the entry {name!r} inside a directory record replaces another record")
        if isinstance(record["was"], dict) and "was" in record["was"]:
            raise RecordError(f"the entry {name!r} replaces a record that replaces another")
        check_record(name, record["was"], depth + 1)


def present(path: Path) -> bool:
    """Something (a link included, even a dangling one) is at ``path``."""
    return os.path.lexists(path)


def _digest(path: Path, limit: int | None = None) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while limit is None or size < limit:
            block = f.read(1 << 20 if limit is None else min(1 << 20, limit - size))
            if not block:
                break
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def record_of(item: Path, log: bool = False) -> dict:
    """The record of what is at ``item`` now."""
    from clex.io.outdir import MANIFEST

    info = os.lstat(item)
    if stat.S_ISLNK(info.st_mode):
        return {"type": "link", "target": os.readlink(item)}
    if stat.S_ISREG(info.st_mode):
        size, digest = _digest(item)
        return {"type": "log", "size": size, "sha256": digest, "ino": info.st_ino} if log else \
            {"type": "file", "size": size, "sha256": digest}
    if stat.S_ISDIR(info.st_mode):
        if (item / MANIFEST).exists():
            return {"type": "outdir"}
        return {"type": "dir", "entries": {child.name: record_of(child) for child in sorted(item.iterdir())}}
    raise RecordError(f"{item} is neither a file, a directory nor a link")


def temp_record(item: Path) -> dict:
    return {"type": "tmp", "ino": os.lstat(item).st_ino}


def current(path: Path, record: dict) -> dict | None:
    """The version of ``record`` at ``path``: itself, or the one it replaces (a kill before the rename)."""
    now = {k: v for k, v in record.items() if k != "was"}
    if _matches(path, now):
        return now
    return current(path, record["was"]) if record.get("was") else None


def matches(path: Path, record: dict) -> bool:
    """True when what is at ``path`` is what ``record`` (or the version it replaces) describes, never
    following a link."""
    return current(path, record) is not None


def _matches(path: Path, record: dict) -> bool:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    kind = record["type"]
    if kind == "link":
        return stat.S_ISLNK(info.st_mode) and os.readlink(path) == record["target"]
    if kind == "tmp":
        return info.st_ino == record["ino"]
    if kind in ("file", "log"):
        if not stat.S_ISREG(info.st_mode) or info.st_size < record["size"]:
            return False
        if kind == "file" and info.st_size != record["size"]:
            return False
        if kind == "log" and record["size"] == 0 and info.st_size > 0 and info.st_ino != record.get("ino"):
            return False  # an empty prefix proves nothing: only the file clex created may have grown
        return _digest(path, record["size"]) == (record["size"], record["sha256"])
    if not stat.S_ISDIR(info.st_mode):
        return False
    if kind == "dir":
        entries = record["entries"]
        return set(os.listdir(path)) == set(entries) and all(matches(path / n, r) for n, r in entries.items())
    return _outdir_matches(path)


def first_difference(path: Path, record: dict) -> Path | None:
    """The first place where ``path`` differs from ``record`` (None when it matches), to name it."""
    now = current(path, record)
    if now is not None:
        return None
    if record["type"] == "dir" and os.path.isdir(path) and not os.path.islink(path):
        entries = record["entries"]
        for name in sorted(set(os.listdir(path)) | set(entries)):
            if name not in entries or not present(path / name):
                return path / name
            inner = first_difference(path / name, entries[name])
            if inner is not None:
                return inner
    return path


MAX_NESTING = 8  # output directories inside output directories (clex writes two levels)
_nesting = [0]


def _outdir_matches(path: Path) -> bool:
    """A nested output directory matches when its own manifest is valid, nothing in it is foreign or
    changed, and no job holds it; an empty one (a kill before its manifest was written) matches too."""
    from clex.io import outdir

    if not os.listdir(path):
        return True
    if _nesting[0] >= MAX_NESTING:
        return False  # deeper than clex ever writes: kept, and named by the caller
    _nesting[0] += 1
    try:
        nested = outdir.read(path)
        outdir.check_unlocked(path)
        return not outdir.foreign(path) and not nested.changed()
    except outdir.OutDirError:
        return False
    finally:
        _nesting[0] -= 1


def remove(root: Path, name: str, record: dict) -> None:
    """Remove ``root/name`` as recorded (the caller checked that it matches): a link is unlinked, never
    followed; a nested output directory loses only what its own manifest records."""
    path = Path(root) / check_name(name)  # one plain component: never anything outside ``root``
    record = current(path, record) or record
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        path.unlink()
    elif record.get("type") == "tmp":
        shutil.rmtree(path)  # clex's own temporary; rmtree removes links inside it, never their targets
    elif record.get("type") == "dir":
        entries = record["entries"]
        for child in entries:
            remove(path, child, entries[child])
        path.rmdir()
    else:
        _remove_outdir(path)


def _remove_outdir(path: Path) -> None:
    from clex.io import outdir

    if not os.listdir(path):
        path.rmdir()
        return
    nested = outdir.read(path)
    nested.clear()
    left = [p for p in path.iterdir() if p.name not in (outdir.MANIFEST, outdir.LOCK)]
    if not left:  # clex's temporaries left unrecorded by a kill stay, and so does the directory
        for own in (outdir.LOCK, outdir.MANIFEST):
            (path / own).unlink(missing_ok=True)
        path.rmdir()
