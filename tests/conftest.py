"""Fixtures and hooks shared by the tests; the tiny models they build are in ``tiny.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers.utils import logging as hf_logging

from tiny import FAMILIES, save_llama

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

WORDS = ["the", "state", "of", "union", "is", "strong", "congress", "people", "nation", "peace"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own token cache (never the user's ~/.cache/clex)."""
    monkeypatch.setenv("CLEX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """``tiny.save_llama()``: the tiny Llama (L = 32, seed 0) saved once for the session. Read only: a test that
    writes into its model directory saves its own."""
    return save_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="session")
def words_corpus(tmp_path_factory) -> Path:
    """A text file of 3000 words drawn from ten (seed 0): what the training tests learn from. Read only."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(np.random.default_rng(0).choice(WORDS, 3000)))
    return path
