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
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .cachedir import cache_root
from .corpora import BUILTIN
from .data_types import DataError, Document
from .jsonfile import JSONFileError, loads

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
                raise DataError(f"{where}: record has no field {text_field!r} (see --text-field)")
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


# --- tokenizers -------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): the tokenizer of clex's tiny models."""

    name = "bytes"
    vocab_size = 256
    eos_token_id = None
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_tokenizer(name_or_path: str):
    """``"bytes"`` or anything ``AutoTokenizer`` loads (a model directory, a hub name)."""
    if name_or_path == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise DataError(
            f"no tokenizer at {name_or_path!r} ({str(err).splitlines()[0][:160]}); pass --tokenizer bytes "
            "or a tokenizer directory"
        ) from err


def tokenizer_fingerprint(tokenizer) -> str:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.fingerprint
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}:{blob}".encode()).hexdigest()[:16]


def encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of ``ids`` (byte-level ids have no special tokens to skip)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode(ids)
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# --- token cache ------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where token ids are cached: ``tokens`` under :func:`clex.cachedir.cache_root`."""
    return cache_root() / "tokens"


def tokenize_documents(docs: list[Document], tokenizer, cache: bool = True) -> list[np.ndarray]:
    """Token ids of each document (int32), cached on disk by (documents, tokenizer)."""
    corpus = hashlib.sha256()
    for d in docs:
        corpus.update(d.id.encode())
        corpus.update(b"\0")
        corpus.update(d.text.encode())
        corpus.update(b"\1")
    key = hashlib.sha256(f"{corpus.hexdigest()}:{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.npz"
    if cache and path.exists():
        cached = _read_cache(path, len(docs))
        if cached is not None:
            return cached
    ids = [np.asarray(encode(tokenizer, d.text), dtype=np.int32) for d in docs]
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot create the token cache {path.parent} ({err.strerror or err}); set CLEX_CACHE "
                            "to a folder clex may write") from None
        offsets = np.cumsum([0, *(len(x) for x in ids)])
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, tokens=np.concatenate(ids) if ids else np.zeros(0, np.int32), offsets=offsets)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    return ids


def _read_cache(path: Path, n_docs: int) -> list[np.ndarray] | None:
    """The cached token ids of ``n_docs`` documents, or None (with a line on stderr) when the file is
    unreadable or inconsistent: it is then rebuilt. Never unpickles (``allow_pickle=False``)."""
    import sys
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as f:
            tokens, offsets = f["tokens"], f["offsets"]
        ok = (tokens.ndim == 1 and offsets.ndim == 1 and len(offsets) == n_docs + 1 and offsets[0] == 0
              and offsets[-1] == len(tokens) and bool(np.all(np.diff(offsets) >= 0))
              and np.issubdtype(tokens.dtype, np.integer))
        reason = "inconsistent contents"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        ok, reason = False, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'unreadable'}"
    if not ok:
        print(f"clex: token cache {path} is corrupt ({reason}); rebuilding it", file=sys.stderr)
        return None
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


# --- windows ----------------------------------------------------------------------------------------
def join_documents(token_docs: list[np.ndarray], separator: int | None = None) -> np.ndarray:
    """All documents as one token stream, ``separator`` (if any) between consecutive documents."""
    pieces = []
    for i, d in enumerate(token_docs):
        if i and separator is not None:
            pieces.append(np.asarray([separator], dtype=np.int32))
        pieces.append(np.asarray(d, dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def make_windows(
    token_docs: list[np.ndarray],
    length: int,
    samples: int | None = None,
    mode: str = "filter",
    separator: int | None = None,
) -> list[np.ndarray]:
    """Non-overlapping windows of exactly ``length`` tokens.

    ``filter`` (default, the YaRN/CLEX protocol): windows are cut from each document long enough
    for one, from its start; ``concat``: documents are joined (with ``separator`` between them if
    given) into one stream first. With ``samples``, that many windows are taken evenly spread over
    all candidates — deterministic, so every method sees the same windows.
    """
    if mode not in CONCAT_MODES:
        raise DataError(f"mode must be one of {CONCAT_MODES}, got {mode!r}")
    if not isinstance(length, int) or length < 2:
        raise DataError(f"length must be an integer >= 2, got {length!r}")
    if mode == "concat":
        token_docs = [join_documents(token_docs, separator)] if token_docs else []
    candidates = [d[i * length : (i + 1) * length] for d in token_docs for i in range(len(d) // length)]
    if not candidates:
        longest = max((len(d) for d in token_docs), default=0)
        raise DataError(
            f"length {length} is longer than every document (the longest has {longest} tokens); "
            "use shorter lengths or --concat"
        )
    if samples is None or samples >= len(candidates):
        return candidates
    if samples < 1:
        raise DataError(f"samples must be >= 1, got {samples}")
    picks = np.unique(np.linspace(0, len(candidates) - 1, samples).round().astype(int))
    return [candidates[i] for i in picks]


def parse_length(text: str | int) -> int:
    """``"4k"`` → 4096, ``"1500"`` → 1500."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", str(text))
    if not match:
        raise DataError(f"length {text!r} must be an integer, optionally with a k suffix (4k = 4096)")
    value = int(match.group(1)) * (1024 if match.group(2) else 1)
    if value < 2:
        raise DataError(f"length {text!r} must be at least 2 tokens")
    return value
