"""Where clex keeps what it can rebuild (token ids, the code corpus's wheel): ``$CLEX_CACHE``, else
``~/.cache/clex``. Never a folder relative to the working directory, which would scatter caches
wherever a command happens to run."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$CLEX_CACHE`` when set (and not empty), else ``<home>/.cache/clex``.

    ``HOME`` set but empty or relative makes ``Path.home()`` answer ``/`` or a relative path, so it is
    refused; ``HOME`` unset falls back (as ``Path.home()`` does) to the password database's home,
    which is refused only when there is none or it is not absolute.
    """
    configured = os.environ.get("CLEX_CACHE", "")
    if configured:
        return Path(configured).expanduser()
    home = os.environ.get("HOME")
    fix = "set CLEX_CACHE to a folder for clex's cache, or HOME to your home directory"
    if home is not None and not os.path.isabs(home):
        raise ValueError(f"HOME is {'empty' if not home else f'not an absolute path ({home!r})'}; {fix}")
    try:
        root = Path.home()
    except RuntimeError:  # HOME unset and no entry in the password database
        raise ValueError(f"HOME is not set and there is no home directory for this user; {fix}") from None
    if not root.is_absolute():
        raise ValueError(f"the home directory {str(root)!r} is not an absolute path; {fix}")
    return root / ".cache" / "clex"
