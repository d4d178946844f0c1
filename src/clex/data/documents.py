"""One data path: corpora → documents → token streams (cached on disk) → fixed-length windows.

Sources (``load_documents``):

* ``sotu[:split]``, ``kjv[:split]``, ``code[:split]`` — the built-in corpora (``clex.corpora``: State of
  the Union addresses, the King James Bible, the Python sources of a pinned sympy);
* a local ``.txt`` file (one document), a folder of them, a ``.jsonl`` file (field ``text``), or a
  ``.parquet`` file (column ``text``), optionally with ``:split``;
* anything else is a Hugging Face dataset name (``name[:split]``), loaded through ``datasets``.

Splits are by document and never change between versions: a document goes to ``test`` when the
hash of its id falls in the first 5 % of buckets, to ``validation`` in the next 5 %, else ``train``
(``all`` keeps everything). Ids are file names (sotu, folders), book names (kjv), paths in the package
(code), record indices.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from clex.data.corpora import BUILTIN
from clex.data.types import DataError, Document
from clex.jsonfile import JSONFileError, loads

SPLITS = ("train", "validation", "test", "all")
CONCAT_MODES = ("filter", "concat")


# --- splits -----------------------------------------------------------------------------------------
def split_of(doc_id: str) -> str:
    """The split of a document, from a hash of its id alone (stable across versions)."""
    bucket = int(hashlib.sha256(f"clex-split:{doc_id}".encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < 5 else "validation" if bucket < 10 else "train"


def _select(docs: list[Document], split: str | None) -> list[Document]:
    if split in (None, "all"):
        return docs
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return [d for d in docs if split_of(d.id) == split]


# --- sources ----------------------------------------------------------------------------------------
def parse_source(source: str) -> tuple[str, str | None]:
    """``"sotu:test"`` → ``("sotu", "test")``; a path that exists as written is never split."""
    if os.path.exists(source):
        return source, None
    head, sep, tail = source.rpartition(":")
    if sep and tail in SPLITS:
        return head, tail
    if sep and (head in BUILTIN or os.path.exists(head)):
        raise DataError(f"unknown split {tail!r} in {source!r}; use one of {', '.join(SPLITS)}")
    return source, None


def load_documents(source: str, text_field: str = "text") -> list[Document]:
    """The documents of ``source`` (see the module docstring), non-empty, in a fixed order."""
    name, split = parse_source(source)
    if name in BUILTIN:
        docs = BUILTIN[name]()
    elif os.path.exists(name):
        docs = _local(Path(name), text_field)
    elif _looks_like_path(name):
        raise DataError(f"data source {name!r} not found (no such file or folder)")
    else:
        docs = _hub(name, split, text_field)
        split = None  # the hub's own split was used
    docs = _select([d for d in docs if d.text.strip()], split)
    if not docs:
        raise DataError(f"data source {source!r} has no non-empty documents")
    return docs


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or bool(re.search(r"\.(txt|jsonl|json|parquet)$", name))


def _local(path: Path, text_field: str) -> list[Document]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {path} holds no .txt files")
        return [Document(str(p.relative_to(path)), read_text(p)) for p in files]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Document(path.name, read_text(path))]
    if suffix in (".jsonl", ".json"):
        docs = []
        hint = f"each line must be one JSON object with a {text_field!r} field"
        for no, line in jsonl_lines(path):
            where, record = f"{path}:{no}", json_line(line, path, no, hint)
            if not isinstance(record, dict):
                raise DataError(f"{where}: a record must be a JSON object with a {text_field!r} field, got "
                                f"{json_kind(record)}")
            if text_field not in record:
                raise DataError(f"{where}: record has no field {text_field!r} (see `text_field`)")
            doc_id = record.get("id", no - 1)
            if not isinstance(doc_id, str | int | float) or isinstance(doc_id, bool):
                raise field_error(where, "id", "a string or a number", doc_id)
            docs.append(Document(str(doc_id), _text(record[text_field], where, text_field)))
        return docs
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DataError("reading .parquet needs pyarrow: pip install 'clex-llm[eval]'") from err
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(f"{path}: no column {text_field!r}; columns are {table.column_names}")
        return [Document(str(i), _text(t, f"{path}: row {i}", text_field))
                for i, t in enumerate(table.column(text_field).to_pylist())]
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .txt, a folder, .jsonl or .parquet)")


# --- reading files users give ------------------------------------------------------------------------
def decode_text(data: bytes, name: str, line: int | None = None, fix: str = "save it as UTF-8") -> str:
    """``data`` as UTF-8 text, or a DataError ``name:line: not UTF-8 text (byte … at column …); fix``; ``line``
    is that of ``data``'s first line in the file (counted here when ``data`` is the whole file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        newline = b"\n"
        line_start = data.rfind(newline, 0, err.start) + 1
        at = line if line is not None else data.count(newline, 0, err.start) + 1
        raise DataError(f"{name}:{at}: not UTF-8 text (byte 0x{data[err.start]:02x} at column "
                        f"{err.start - line_start + 1}); {fix}") from None


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file the user gave; another encoding is refused naming the file, line and column."""
    return decode_text(Path(path).read_bytes(), str(path))


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for each non-blank line of a JSON-lines file; decoding is left to
    :func:`json_line`, so a reader that skips bad records can skip an undecodable one too."""
    with open(path, "rb") as f:
        for no, line in enumerate(f, 1):
            if line.strip():
                yield no, line


def json_line(line: bytes, path: str | Path, no: int, hint: str = "") -> object:
    """Line ``no`` of a JSON-lines file, read through :mod:`clex.jsonfile` (bounded nesting): a line that is not
    UTF-8 or not JSON is one DataError ``file:line: reason`` (then ``; hint`` when given)."""
    where = f"{path}:{no}"
    text = decode_text(line, str(path), no)
    try:
        return loads(text, where)
    except JSONFileError as err:
        reason = str(err).removeprefix(f"{where} ").removeprefix("is ")
        raise DataError(f"{where}: {reason}" + (f"; {hint}" if hint else "")) from None


def json_kind(value: object) -> str:
    """How a JSON value is called in messages: null, a string, a number, a list (or an empty one), an object…"""
    if value is None or value == []:
        return "null" if value is None else "an empty list"
    names = {str: "a string", list: "a list", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def field_error(where: str, name: str, wanted: str, value: object) -> DataError:
    """``where: field 'name' must be <wanted>, got <kind>``: the one wording of a record field of the wrong type."""
    return DataError(f"{where}: field {name!r} must be {wanted}, got {json_kind(value)}")


def is_string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (one quick try, no retries)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _hub(name: str, split: str | None, text_field: str) -> list[Document]:
    """A Hugging Face dataset by name. Offline it fails at once (``datasets`` itself retries for
    half a minute); with ``HF_HUB_OFFLINE=1`` it reads the local datasets cache instead."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True") and not hub_reachable():
        raise DataError(
            f"{name!r} is not a built-in corpus ({', '.join(BUILTIN)}) or a local path, and the Hugging Face "
            "hub is unreachable (offline?); set HF_HUB_OFFLINE=1 to use a locally cached dataset"
        )
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{name!r} is not a built-in corpus ({', '.join(BUILTIN)}) or a local path; loading it as a "
            "Hugging Face dataset needs `datasets`: pip install 'clex-llm[eval]'"
        ) from err
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # network, missing dataset, bad split: one clear line
        raise DataError(
            f"could not load {name!r} from the Hugging Face hub ({type(err).__name__}: {str(err)[:200]}); "
            f"offline, use a built-in corpus ({', '.join(BUILTIN)}) or a local file"
        ) from err
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r}; columns are {ds.column_names}")
    return [Document(str(i), _text(t, f"dataset {name!r}: row {i}", text_field)) for i, t in enumerate(ds[text_field])]


def _text(value, where: str, text_field: str) -> str:
    """A record's text, which must be a string (null, numbers or lists are refused, never str()-ed)."""
    if not isinstance(value, str):
        raise field_error(where, text_field, "a string", value)
    return value
