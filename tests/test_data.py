"""The data path: sources, splits, token cache, windows, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clex import data as D


def test_builtin_splits_are_disjoint_complete_and_pinned():
    for corpus in ("sotu", "kjv"):
        every = {d.id for d in D.load_documents(corpus)}
        parts = {s: {d.id for d in D.load_documents(f"{corpus}:{s}")} for s in ("train", "validation", "test")}
        assert not parts["train"] & parts["test"] and not parts["train"] & parts["validation"]
        assert not parts["validation"] & parts["test"]
        assert parts["train"] | parts["validation"] | parts["test"] == every
        assert parts["test"] and parts["validation"]
    # the split depends on nothing but the document id: pinned so that it never changes silently
    test_ids = sorted(d.id for d in D.load_documents("sotu:test"))
    assert len(test_ids) == 13 and "1790-Washington-2" in test_ids and "2024-Biden-1" in test_ids
    assert [D.split_of(i) for i in ("1790-Washington-2", "Zephaniah", "Psalms")] == ["test", "test", "validation"]


def _fake_package(root):
    files = {"sympy/__init__.py": "x = 1\n", "sympy/core/expr.py": "class Expr:\n    pass\n",
             "sympy/core/tests/test_expr.py": "def test(): pass\n", "sympy/test_runner.py": "t = 0\n",
             "sympy/data.txt": "not code", "other/mod.py": "y = 2\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return files


def test_code_corpus_reads_an_installed_package_and_its_wheel_alike(tmp_path):
    import zipfile

    from clex.data import corpora

    files = _fake_package(tmp_path / "site")
    wheel = tmp_path / "sympy.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    from_dir = corpora.code_from_directory(tmp_path / "site")
    # non-test modules of the package only, id = path in the wheel; the same documents either way
    assert [d.id for d in from_dir] == ["sympy/__init__.py", "sympy/core/expr.py"]
    assert from_dir == corpora.code_from_wheel(wheel)
    (tmp_path / "broken.whl").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(D.DataError, match="not a readable sympy wheel"):
        corpora.code_from_wheel(tmp_path / "broken.whl")


def test_code_corpus_is_the_pinned_release_split_by_path():
    import importlib.metadata

    from clex.data import corpora

    if importlib.metadata.version("sympy") != corpora.CODE_VERSION:  # constraints.txt pins it for `make`
        pytest.skip(f"sympy {corpora.CODE_VERSION} is not installed (the corpus would be downloaded)")
    docs = D.load_documents("code")
    assert len(docs) == 839 and docs[0].id == "sympy/__init__.py"
    assert all(corpora.is_code_module(d.id) for d in docs)
    parts = {s: {d.id for d in D.load_documents(f"code:{s}")} for s in ("train", "validation", "test")}
    assert sum(map(len, parts.values())) == len(docs) and len(parts["test"]) == 44
    assert "sympy/core/expr.py" in parts["test"] and "sympy/core/basic.py" in parts["train"]
    assert D.split_of("sympy/__init__.py") == "validation"


def test_local_sources(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha " * 10)
    (folder / "b.txt").write_text("beta " * 10)
    (folder / "empty.txt").write_text("   ")
    assert [d.id for d in D.load_documents(str(folder))] == ["a.txt", "b.txt"]
    assert D.load_documents(str(folder / "a.txt"))[0].text == "alpha " * 10
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(3)))
    assert [d.text for d in D.load_documents(str(jsonl), text_field="body")] == ["text 0", "text 1", "text 2"]
    with pytest.raises(D.DataError, match="no field 'text'"):
        D.load_documents(str(jsonl))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "d.parquet")
    assert [d.text for d in D.load_documents(str(tmp_path / "d.parquet"))] == ["one", "two"]
    # a split of a local source uses the same rule on its ids
    many = tmp_path / "many"
    many.mkdir()
    for i in range(60):
        (many / f"{i:02d}.txt").write_text(f"document {i}")
    parts = {s: [d.id for d in D.load_documents(f"{many}:{s}")] for s in ("train", "validation", "test")}
    assert sorted(sum(parts.values(), [])) == sorted(f"{i:02d}.txt" for i in range(60))
    assert all(D.split_of(i) == s for s, ids in parts.items() for i in ids)


@pytest.mark.parametrize(
    "source,match",
    [("./missing.txt", "not found"), ("sotu:testing", "unknown split"), ("someorg/no-such-dataset", "hub")],
)
def test_bad_sources_fail_fast_with_one_line(source, match):
    with pytest.raises(D.DataError, match=match) as err:
        D.load_documents(source)
    assert "\n" not in str(err.value)


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(D.DataError, match="no non-empty documents"):
        D.load_documents(str(tmp_path / "blank.txt"))
    (tmp_path / "e").mkdir()
    with pytest.raises(D.DataError, match="no .txt files"):
        D.load_documents(str(tmp_path / "e"))


def test_tokens_are_cached_on_disk(monkeypatch):
    docs = D.load_documents("kjv:test")
    tok = D.ByteTokenizer()
    first = D.tokenize_documents(docs, tok)
    assert [len(x) for x in first] == [len(d.text.encode()) for d in docs]
    monkeypatch.setattr(D, "encode", lambda *a: pytest.fail("tokenized again instead of reading the cache"))
    second = D.tokenize_documents(docs, tok)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_windows():
    docs = [np.arange(100, dtype=np.int32), np.arange(1000, 1030, dtype=np.int32), np.arange(5000, 5250)]
    w = D.make_windows(docs, 40)
    assert [int(x[0]) for x in w] == [0, 40, 5000, 5040, 5080, 5120, 5160, 5200]
    assert all(len(x) == 40 for x in w)
    picked = D.make_windows(docs, 40, samples=3)
    assert [int(x[0]) for x in picked] == [0, 5080, 5200]  # evenly spread, deterministic
    assert [int(x[0]) for x in D.make_windows(docs, 40, samples=3)] == [0, 5080, 5200]
    joined = D.make_windows(docs, 120, mode="concat", separator=-1)
    assert len(joined) == (100 + 30 + 250 + 2) // 120 and joined[0][100] == -1
    with pytest.raises(D.DataError, match="longest has 250 tokens"):
        D.make_windows(docs, 300)


def test_parse_length():
    assert [D.parse_length(x) for x in ("1k", "4K", "1500", 64)] == [1024, 4096, 1500, 64]
    for bad in ("4m", "k", "-3", "1"):
        with pytest.raises(D.DataError, match="length"):
            D.parse_length(bad)
