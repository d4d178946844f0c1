"""The study's scripts under experiments/: the GPU sweep end to end on a tiny stand-in, its budget, and
the context-value measurement's identities."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _module(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corpus(tmp_path):
    """80 small code-like documents; split by the hash of their names like any folder source."""
    rng = random.Random(0)
    folder = tmp_path / "corpus"
    folder.mkdir()
    words = ["def", "return", "self", "value", "index", "result", "for", "in", "if", "else", "import", "class"]
    for i in range(80):
        names = [f"name_{rng.randrange(40)}" for _ in range(6)]
        lines = [f"{rng.choice(words)} {rng.choice(names)} = {rng.choice(names)}({i % 9})" for _ in range(60)]
        (folder / f"mod_{i:02d}.txt").write_text("\n".join(lines))
    return folder


def test_gpu_sweep_runs_end_to_end_resumes_and_keeps_to_its_budget(corpus, tmp_path):
    sweep = _module("gpu_sweep")
    plan = dataclasses.replace(sweep.TINY, data=str(corpus), sizes=sweep.TINY.sizes[:1])
    out = tmp_path / "sweep"
    results = sweep.run(plan, out, budget_s=1e9, tiny=True)
    table = results["sizes"]["s"]
    assert set(table) == set(sweep.METHODS)
    for runs in table.values():
        assert [r["seed"] for r in runs] == list(plan.seeds)
        assert all(math.isfinite(r[str(k * plan.L0)]) for r in runs for k in plan.factors)
    assert json.loads((out / "results.json").read_text())["sizes"]["s"] == table
    assert "| clex:max_factor=16 |" in (out / "results.md").read_text()
    # a re-run trains and evaluates nothing again: every run is finished, every evaluation cached
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("s/*/model.safetensors")}
    again = sweep.run(plan, out, budget_s=1e9, tiny=True)
    assert again["sizes"] == results["sizes"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("s/*/model.safetensors")} == stamps
    # past its budget the sweep starts nothing and says where it stopped
    stopped = sweep.run(plan, tmp_path / "none", budget_s=0, tiny=True)
    assert stopped["stopped_before"] == "pre-training s" and stopped["sizes"] == {}
    assert not (tmp_path / "none" / "s").exists()


def test_gpu_sweep_prepare_leaves_the_gpu_run_nothing_to_tokenize(corpus, tmp_path, monkeypatch):
    sweep = _module("gpu_sweep")
    plan = dataclasses.replace(sweep.TINY, data=str(corpus), sizes=sweep.TINY.sizes[:1], seeds=())
    cache = tmp_path / "carried"
    monkeypatch.setenv("CLEX_CACHE", str(cache))
    sweep.prepare(plan, cache)
    caches = sorted((cache / "tokens").glob("*.npz"))
    assert len(caches) == 2  # train and validation, tokenized with the prepared BPE
    sweep.run(plan, tmp_path / "out", budget_s=1e9, tiny=True, given_tokenizer=cache / "tokenizer")
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_bytes() == (
        cache / "tokenizer" / "tokenizer.json").read_bytes()
    assert sorted((cache / "tokens").glob("*.npz")) == caches  # pre-training read the prepared token ids


def test_gpu_sweep_plan_fits_its_budget_at_its_own_assumptions():
    sweep = _module("gpu_sweep")
    rows = sweep.estimate(sweep.GPU)
    assert [r["size"] for r in rows] == ["s", "m", "l"]
    assert sum(r["seconds"] for r in rows) < 420  # the default --budget-s, itself inside 8 minutes of device time
    non_embedding = [r["non_embedding"] for r in rows]
    assert 1.5e6 < non_embedding[0] < 3e6 and 20e6 < non_embedding[1] < 40e6 and 100e6 < non_embedding[2] < 130e6


def test_context_value_is_zero_at_L0_and_scores_the_same_tokens(corpus, tmp_path):
    from tiny import save_llama

    cv = _module("context_value")
    save_llama(tmp_path / "m", num_key_value_heads=4, max_position_embeddings=16)
    out = cv.context_value(str(tmp_path / "m"), "clex:max_factor=4", f"{corpus}:all", [1, 4], samples=3, stride=4)
    assert out[1]["worth"] == 0 and out[1]["full"] == out[1]["last_L0"]
    assert out[4]["tokens"] == 3 * (4 * 16 - 1) and out[4]["full"] != out[4]["last_L0"]


def test_study_trains_each_variants_own_seeds_and_tabulates_them(tmp_path, monkeypatch):
    """A variant's ``seeds`` overrides the study's (one variant's seeds split between two processes)."""
    study = _module("study")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")  # a base is there: nothing to pre-train
    trained = []
    monkeypatch.setattr(study, "train_run", lambda run, seed, **kw: trained.append((run.name, seed)))
    monkeypatch.setattr(study, "_evaluate", lambda run, spec, s, tok, cache=None: {1: 2.0 + len(trained), 4: 3.0})
    config = {"base": str(base), "out": str(tmp_path / "out"), "data": "code:validation", "factors": [1, 4],
              "samples": 2, "seeds": [0, 1, 2], "train": {"steps": 1},
              "variants": [{"name": "A", "method": "pi:factor=2"},
                           {"name": "B", "method": "ntk:factor=2", "seeds": [2]}]}
    (tmp_path / "out").mkdir()
    path = tmp_path / "study.json"
    path.write_text(json.dumps(config))
    study.main(str(path))
    assert trained == [("A-seed0", 0), ("A-seed1", 1), ("A-seed2", 2), ("B-seed2", 2)]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| A | 4.000 (3.000–5.000) | 3.000 (3.000–3.000) |" in table
    assert "| B (seeds [2]) | 6.000 (6.000–6.000) |" in table  # not the header's seeds [0, 1, 2]
