"""What flows into a model: documents, tokenizers, token windows, corpora, chat records, fetched weights.

``documents`` reads text from files or the hub, ``tokens`` turns it into token arrays and windows (with an
on-disk cache), ``corpora`` resolves the named corpora clex ships, ``chat`` renders and labels
conversations, ``fetch`` converts a GGUF model to safetensors. May import the core and ``clex.io``; not
training, evaluation, serving or the CLI.
"""

from clex.data.documents import (
    CONCAT_MODES,
    SPLITS,
    decode_text,
    field_error,
    hub_reachable,
    is_string_list,
    json_kind,
    json_line,
    jsonl_lines,
    load_documents,
    parse_source,
    read_text,
    split_of,
)
from clex.data.tokens import (
    ByteTokenizer,
    cache_dir,
    decode,
    encode,
    join_documents,
    load_tokenizer,
    make_windows,
    parse_length,
    tokenize_documents,
    tokenizer_fingerprint,
)
from clex.data.types import DataError, Document

__all__ = [
    "CONCAT_MODES", "SPLITS", "ByteTokenizer", "DataError", "Document", "cache_dir", "decode", "decode_text",
    "encode", "field_error", "hub_reachable", "is_string_list", "join_documents", "json_kind", "json_line",
    "jsonl_lines", "load_documents", "load_tokenizer", "make_windows", "parse_length", "parse_source",
    "read_text", "split_of", "tokenize_documents", "tokenizer_fingerprint",
]
