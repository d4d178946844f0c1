"""The one way clex writes a file or directory: into a temporary of its own beside the target, then renamed
onto it, so a reader (or a kill at any moment) sees the old content or the new, never half of it.

Temporaries are named ``.clex-tmp-<name>-…`` and created exclusively, so a temporary is never a file someone
else put there. ``clex.io.outdir.write_in`` adds the manifest record where the directory has one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".clex-tmp-"  # clex's own temporaries: removed only when recorded


def atomic_write(path: Path, fill: Callable[[Path], None]) -> Path:
    """Write ``path`` whole: ``fill`` writes a fresh temporary beside it, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_temp_file(path)
    try:
        fill(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """Write directory ``path`` whole: ``fill`` fills a fresh temporary directory beside it, which then takes
    its place (an empty directory already at ``path`` is replaced; a failed ``fill`` leaves nothing behind)."""
    import shutil

    path = Path(path)
    tmp = fresh_temp_dir(path)
    try:
        fill(tmp)
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own fresh directory: nothing of anyone else's is in it
        raise
    return path


def fresh_temp_dir(beside: Path) -> Path:
    """A new directory of clex's own next to ``beside`` (to fill, then rename onto it), with the mode a plain
    ``mkdir`` would give (``mkdtemp``'s 0700 would become the output's)."""
    import tempfile

    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{beside.name}-", dir=beside.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def fresh_temp_file(beside: Path) -> Path:
    """A new, empty file of clex's own next to ``beside`` (created exclusively, so it is never a file someone
    else put there under the same name), to fill and then rename onto ``beside``."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{beside.name}-", dir=beside.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask
