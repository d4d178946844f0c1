"""Reading JSON that clex did not necessarily write: bounded in size and depth, every failure naming the file.

Python's ``json`` parses arbitrarily large files and raises ``RecursionError`` on deep nesting (and code
walking a parsed value recursively can hit it too), so every JSON file or line clex reads goes through
:func:`read_json` or :func:`loads`: at most ``max_bytes``, at most ``MAX_DEPTH`` levels of nesting, one
``JSONFileError`` (a ``ValueError``) whose message names the file or line and what is wrong.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from clex.errors import DamagedFile

MAX_DEPTH = 64
MAX_BYTES = 16 << 20


JSONFileError = DamagedFile  # the name the readers raise


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def loads(text: str | bytes, where: str, *, expect: type | tuple[type, ...] | None = None,
          max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``text`` (from ``where``: a file, or ``file:line``), refusing deep nesting and, with ``expect``,
    another top-level type."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError as err:
        raise JSONFileError(f"{where} is not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise JSONFileError(f"{where} nests deeper than {max_depth} levels") from None
    except ValueError as err:
        raise JSONFileError(f"{where} is not valid JSON ({err})") from None
    if not _depth_ok(value, max_depth):
        raise JSONFileError(f"{where} nests deeper than {max_depth} levels")
    if expect is not None and (not isinstance(value, expect) or (expect is int and isinstance(value, bool))):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        shown = {"dict": "a JSON object", "list": "a JSON list"}.get(names, names)
        raise JSONFileError(f"{where} does not hold {shown}")
    return value


def read_json(path: str | Path, *, expect: type | tuple[type, ...] | None = dict, max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value in ``path`` (a JSON object unless ``expect`` says otherwise); ``FileNotFoundError``
    passes through for the caller to word, every other failure is one :class:`JSONFileError`."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe or a device would block or never end
            raise JSONFileError(f"{path} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise JSONFileError(f"{path} cannot be read ({err.strerror or err})") from None
    if len(data) > max_bytes:
        raise JSONFileError(f"{path} is larger than {max_bytes >> 20} MiB, more than clex ever writes or reads there")
    return loads(data, str(path), expect=expect, max_depth=max_depth)
