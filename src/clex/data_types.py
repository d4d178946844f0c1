"""What the data path's modules share (``data`` and ``corpora``), in a module of its own so neither imports
the other's internals."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A data source or request that cannot be served; the message says what to change."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str
