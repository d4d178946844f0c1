"""``clex demo``: the report's structure, determinism, and resuming where it stopped."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from clex.cli.demo import DemoConfig, quick_config, run_demo
from clex.cli.main import main


def _micro(out) -> DemoConfig:
    return quick_config(out=str(out), pretrain_steps=12, finetune_steps=4, save_every=5, eval_factors=(1, 2),
                        eval_samples=2, L0=32, hidden=32, heads=2, intermediate=64)


@pytest.mark.slow
def test_quick_demo_writes_a_complete_finite_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\[1/\d+\] pre-train .* left$", printed, re.M)  # progress with a time estimate
    cfg = quick_config()
    report = (out / "report.md").read_text()
    assert (out / "ppl.png").stat().st_size > 1000
    verdict = report.splitlines()[2]
    assert verdict.startswith("Verdict: the paper's qualitative result")
    assert verdict.split("Verdict:")[1].strip() in printed
    table = report.split("## Perplexity per byte on `sotu:test`")[1].split("\n\n")[1].splitlines()
    header, rows = table[0], table[2:]
    assert header.count("×") == len(cfg.eval_factors)
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels[:2] == ["vanilla RoPE, no fine-tuning", "CLEX untrained (NTK α=2t−1), no fine-tuning"]
    assert {lab.split()[0] for lab in labels[2:]} == {"CLEX", "PI", "YaRN", "NTK"}
    for row in rows:
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert len(cells) == len(cfg.eval_factors)
        assert all(math.isfinite(float(c)) and float(c) > 1 for c in cells), row
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 6
    assert all(math.isfinite(p) for r in records for p in r["ppl"].values())
    # vanilla and untrained CLEX are the same model inside L0: the same perplexity at 1×
    by_label = {r["label"]: r["ppl"] for r in records}
    L0 = str(cfg.L0)
    assert by_label[labels[0]][L0] == pytest.approx(by_label[labels[1]][L0], rel=1e-5)
    for section in ("## Budget", "## Wall time", "Machine:"):
        assert section in report


@pytest.mark.slow
def test_demo_resumes_where_it_stopped_and_is_deterministic(tmp_path):
    whole = run_demo(_micro(tmp_path / "whole"), log=lambda _: None)

    class Stop(Exception):
        pass

    def stop_at_fourth_phase(line: str) -> None:
        if line.startswith("[4/"):
            raise Stop

    cfg = _micro(tmp_path / "split")
    with pytest.raises(Stop):
        run_demo(cfg, log=stop_at_fourth_phase)
    before = (tmp_path / "split" / "base" / "model.safetensors").stat().st_mtime_ns
    assert not (tmp_path / "split" / "report.md").exists()
    lines: list[str] = []
    run_demo(cfg, log=lines.append)
    assert (tmp_path / "split" / "base" / "model.safetensors").stat().st_mtime_ns == before
    assert not list((tmp_path / "split").rglob("checkpoint-*"))
    ppl = [json.loads((d / "results.json").read_text())["records"] for d in (whole, tmp_path / "split")]
    assert [r["ppl"] for r in ppl[0]] == [r["ppl"] for r in ppl[1]]  # same seed, same table
    assert "Verdict: not judged" in (whole / "report.md").read_text()  # 1× and 2× only: no claim either way


@pytest.mark.slow
def test_demo_refuses_other_settings_in_the_same_directory(tmp_path):
    cfg = _micro(tmp_path / "d")
    run_demo(cfg, log=lambda _: None)
    changed = dataclasses.replace(cfg, finetune_steps=5)
    with pytest.raises(ValueError, match="other settings"):
        run_demo(changed, log=lambda _: None)
    assert (tmp_path / "d" / "report.md").exists()  # nothing lost
    run_demo(changed, overwrite=True, log=lambda _: None)
    assert json.loads((tmp_path / "d" / "demo_config.json").read_text())["finetune_steps"] == 5


def test_demo_rejects_bad_settings(tmp_path, capsys):
    for bad in (dict(seeds=0), dict(finetune_steps=-1), dict(factor=1), dict(eval_factors=())):
        with pytest.raises(ValueError, match="must be"):
            quick_config(out=str(tmp_path / "x"), **bad)
    assert main(["demo", "--quick", "--seeds", "0", "--out", str(tmp_path / "y")]) == 2
    assert "seeds must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_cached_ppl_evaluates_only_missing_lengths(tmp_path):
    from clex.cli.demo import cached_ppl, pretrain

    cfg = _micro(tmp_path / "demo")
    pretrain(cfg, tmp_path / "demo")
    model, path = str(tmp_path / "demo" / "base"), tmp_path / "cache.json"
    first = cached_ppl(model, "vanilla", [32], "sotu:validation", 2, path)
    path.write_text(json.dumps({**first, "ppl": {"32": 123.0}}))  # a sentinel: must be reused, not recomputed
    both = cached_ppl(model, "vanilla", [32, 48], "sotu:validation", 2, path)
    fresh = cached_ppl(model, "vanilla", [48], "sotu:validation", 2, tmp_path / "fresh.json")
    assert both["ppl"] == {"32": 123.0, "48": fresh["ppl"]["48"]}
    assert json.loads(path.read_text())["ppl"] == both["ppl"]
    assert cached_ppl(model, "vanilla", [48], "sotu:validation", 2, path)["ppl"] == {"48": fresh["ppl"]["48"]}


@pytest.mark.slow
def test_extra_baselines_are_fine_tuned_tabulated_and_judged(tmp_path):
    from clex.cli.demo import finetune_methods

    with pytest.raises(ValueError, match="repeats a main one"):
        DemoConfig(factor=8, extra_baselines=("yarn:factor=8",))
    for bad in ("clex:max_factor=4", "yarn", "yarn:factor=4,beta_fast=16", "warp:factor=2"):
        with pytest.raises(ValueError):
            DemoConfig(extra_baselines=(bad,))
    cfg = _micro(tmp_path / "demo")
    cfg = dataclasses.replace(cfg, factor=4, eval_factors=(1, 4, 8), extra_baselines=("yarn:factor=2",))
    assert finetune_methods(cfg)["yarn2"] == "yarn:factor=2"
    out = run_demo(cfg, log=lambda _: None)
    report = (out / "report.md").read_text()
    assert "| YaRN ×2 fine-tuned |" in report and (out / "finetuned" / "yarn2-seed0" / "config.json").exists()
    verdict = report.splitlines()[2]
    assert "better than PI ×4, YaRN ×4, YaRN ×2 there" in verdict
    assert re.search(r"CLEX (beats|does not beat) YaRN ×2 at 8×", report)


def test_fine_tuned_baselines_are_evaluated_as_trained(tmp_path):
    """A baseline's row evaluates its fine-tuned model as shipped (``vanilla``): its spec applied again would scale
    on top of the rope it was trained with (PI ×4 twice is PI ×16), and CLEX's row uses its learned path."""
    import torch

    import clex
    from clex.cli.demo import finetune_methods, rows
    from tiny import make_model, tokens

    cfg = _micro(tmp_path)
    row_method = {seed_label: method for seed_label, _, method, seed in rows(cfg, tmp_path) if seed is not None}
    trained = finetune_methods(cfg)
    assert {row_method[label] for label in row_method} == {"clex", "vanilla"}
    assert sum(method == "vanilla" for method in row_method.values()) == len(trained) - 1
    pi = clex.apply(make_model("llama"), "pi:factor=4")
    pi.save_pretrained(tmp_path / "pi")  # as a fine-tuning run leaves it: PI is now the rope it ships with
    as_trained = clex.apply(clex.from_pretrained(tmp_path / "pi", attn_implementation="eager").eval(), "vanilla")
    again = clex.apply(clex.from_pretrained(tmp_path / "pi", attn_implementation="eager").eval(), "pi:factor=4")
    x = tokens(24)
    with torch.no_grad():
        torch.testing.assert_close(as_trained(x).logits, pi(x).logits, rtol=0, atol=0)
        assert not torch.allclose(again(x).logits, pi(x).logits, atol=1e-4)
