"""What the data path's modules share (``data`` and ``corpora``), in a module of its own so neither imports
the other's internals."""

from __future__ import annotations

from dataclasses import dataclass

from clex.errors import BadInput

DataError = BadInput  # the name data code raises


@dataclass(frozen=True)
class Document:
    id: str
    text: str
