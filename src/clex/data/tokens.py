"""Tokenizers (a byte-level one for the tiny models, or any transformers tokenizer), token arrays cached on
disk by content, and the fixed-length windows evaluations score.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clex.data.documents import CONCAT_MODES
from clex.data.types import DataError, Document
from clex.io.atomic import atomic_write
from clex.io.cachedir import cache_root


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
            f"no tokenizer at {name_or_path!r} ({str(err).splitlines()[0][:160]}); pass `tokenizer` bytes "
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

        def fill(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
                np.savez(f, tokens=np.concatenate(ids) if ids else np.zeros(0, np.int32), offsets=offsets)

        atomic_write(path, fill)  # a reader never sees half a file
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
            "use shorter lengths or `concat`"
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
