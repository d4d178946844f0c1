"""One clex job per output directory: ``.clex-lock`` holds the pid and host of the job writing there.

A lock whose process is gone on this host is stale and taken over; a file under the lock's name that is not
a clex lock is refused, naming it, never removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from clex.errors import OutDirError
from clex.jsonfile import JSONFileError, read_json

LOCK = ".clex-lock"


def _alive(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        return True  # cannot tell from here
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock: Path) -> dict | None:
    """The live holder of a lock file, or None (no lock, or a stale one); a file that is not a clex lock is
    refused, naming it."""
    if not (lock.exists() or lock.is_symlink()):
        return None
    if lock.is_symlink() or not lock.is_file():
        raise _bad_lock(lock, "it is not a plain file")
    if lock.stat().st_size == 0 and time.time() - _mtime(lock) < 10:
        return {"pid": "?", "host": "?"}  # being written right now
    try:
        holder = read_json(lock, max_bytes=4096)
    except FileNotFoundError:
        return None
    except JSONFileError as err:
        raise _bad_lock(lock, str(err).replace(str(lock), "").strip()) from None
    pid, host = holder.get("pid"), holder.get("host")
    if not (type(pid) is int and 0 < pid < 1 << 22):
        raise _bad_lock(lock, f"its pid is {pid!r}, not a process id")
    if not isinstance(host, str):
        raise _bad_lock(lock, "it names no host")
    return holder if _alive(holder) else None


def _bad_lock(lock: Path, why: str) -> OutDirError:
    return OutDirError(f"{lock} is not a clex lock ({why}); remove it if no clex job is running in {lock.parent}")


def _busy(path, lock: Path, holder: dict) -> OutDirError:
    return OutDirError(f"{path} is in use by another clex job (pid {holder.get('pid')} on {holder.get('host')}); "
                       f"wait for it to finish, or remove {lock} if that job is gone")


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
        with contextlib.suppress(OSError, ValueError):  # a JSONFileError is a ValueError
            if read_json(lock, max_bytes=4096).get("pid") == me["pid"]:
                lock.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
