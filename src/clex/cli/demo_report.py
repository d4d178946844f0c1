"""The demo's report: the verdict computed from the numbers, the perplexity tables (median and range over
fine-tuning seeds), the plot, the budget and the wall time, written into the demo's directory."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clex.io import outdir
from clex.loading import from_pretrained
from clex.methods import parse_method

if TYPE_CHECKING:
    from clex.cli.demo import DemoConfig


BASELINE_NAMES = {"pi": "PI", "yarn": "YaRN", "ntk": "NTK"}


def label(spec: str) -> str:
    """A fine-tuned method spec as the report names its row."""
    name, params = parse_method(spec)
    if name == "clex":
        return f"CLEX fine-tuned (max_factor {params['max_factor']})"
    return f"{BASELINE_NAMES[name]} ×{params['factor']} fine-tuned"


def summarise(cfg: DemoConfig, records: list[dict], data: str) -> dict[str, dict[int, tuple[float, float, float]]]:
    """label → eval factor → (median, min, max) perplexity over fine-tuning seeds."""
    table: dict[str, dict[int, list[float]]] = {}
    for r in records:
        if r["data"] == data:
            for length, ppl in r["ppl"].items():
                table.setdefault(r["label"], {}).setdefault(int(length) // cfg.L0, []).append(ppl)
    return {label: {k: (statistics.median(v), min(v), max(v)) for k, v in by.items()} for label, by in table.items()}


def verdict(cfg: DemoConfig, records: list[dict]) -> list[str]:
    """The paper's qualitative claim checked against this run's numbers (first eval set)."""
    t = summarise(cfg, records, cfg.eval_data[0])
    f = cfg.factor
    clex = t[label(f"clex:max_factor={f}")]
    rival_specs = [f"pi:factor={f}", f"yarn:factor={f}", *cfg.extra_baselines]
    rivals = {label(s).removesuffix(" fine-tuned"): t[label(s)] for s in rival_specs}
    claim = ("CLEX within 10% of its 1× perplexity at 4× and 8× L0 and better than "
             + ", ".join(rivals) + " there")
    if not {1, 4, 8} <= set(clex):
        return [f"Verdict: not judged ({claim}): the evaluation lengths must include 1×, 4× and 8× L0."]
    lines, holds = [], True
    for k in (4, 8):
        ratio = clex[k][0] / clex[1][0]
        within = ratio <= 1.10
        holds &= within
        lines.append(f"CLEX at {k}× L0 is {ratio - 1:+.1%} from its 1× perplexity ({clex[k][0]:.3f} vs "
                     f"{clex[1][0]:.3f}): {'within' if within else 'not within'} 10%.")
        for name, rival in rivals.items():
            beats = clex[k][0] < rival[k][0]
            holds &= beats
            overlap = cfg.seeds > 1 and clex[k][2] >= rival[k][1] and rival[k][2] >= clex[k][1]
            lines.append(f"CLEX {'beats' if beats else 'does not beat'} {name} at {k}× "
                         f"({clex[k][0]:.3f} vs {rival[k][0]:.3f}, {clex[k][0] / rival[k][0] - 1:+.1%})"
                         + (" — the seed ranges overlap." if overlap else "."))
    head = (f"Verdict: the paper's qualitative result ({claim}) {'holds' if holds else 'does NOT hold'} in this "
            f"run ({'1 fine-tuning seed' if cfg.seeds == 1 else f'medians over {cfg.seeds} fine-tuning seeds'}).")
    return [head, *lines]


def _cell(stats: tuple[float, float, float] | None, seeds: int) -> str:
    if stats is None:
        return "–"
    med, lo, hi = stats
    fmt = (lambda x: f"{x:.3f}") if math.isfinite(med) and med < 1e4 else (lambda x: f"{x:.3g}")
    return fmt(med) + (f" ({fmt(lo)}–{fmt(hi)})" if seeds > 1 and hi > lo else "")


def write_demo_report(cfg: DemoConfig, out: Path, records: list[dict], timings: dict) -> Path:
    from clex.eval import report as R

    labels = list(dict.fromkeys(r["label"] for r in records))
    lines = ["# clex demo: CLEX against PI, YaRN and NTK on a tiny byte-level Llama", ""]
    head, *details = verdict(cfg, records)
    lines += [head, "", *(f"- {line}" for line in details), ""]
    for data in cfg.eval_data:
        t = summarise(cfg, records, data)
        note = f", median (range) over {cfg.seeds} fine-tuning seeds" if cfg.seeds > 1 else ", one fine-tuning seed"
        lines += [f"## Perplexity per byte on `{data}` ({cfg.eval_samples} windows per length{note})", "",
                  "| model | " + " | ".join(f"{k}× ({k * cfg.L0})" for k in cfg.eval_factors) + " |",
                  "| --- |" + " --- |" * len(cfg.eval_factors)]
        lines += [f"| {label} | " + " | ".join(_cell(t.get(label, {}).get(k), cfg.seeds) for k in cfg.eval_factors)
                  + " |" for label in labels]
        lines.append("")
    lines += ["![perplexity against length](ppl.png)", "", "## Budget", ""]
    model_params = sum(p.numel() for p in from_pretrained(out / "base").parameters())
    tokens = cfg.batch_size * cfg.L0
    lines += [
        f"- Base model: Llama, {cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, {model_params / 1e6:.2f}M "
        f"parameters, byte tokens, plain RoPE (θ base 10000) at L0 = {cfg.L0}.",
        f"- Pre-training: {cfg.pretrain_steps} steps × {cfg.batch_size} × {cfg.L0} tokens of `{cfg.train_data}`, "
        f"lr {cfg.pretrain_lr:g}, cosine, seed {cfg.seed}.",
        f"- Fine-tuning, every method: {cfg.finetune_steps} steps × {tokens} tokens at L0 "
        f"({cfg.finetune_steps * tokens / 1e6:.2f}M tokens), lr {cfg.lr:g}, cosine with 3% warm-up, gradient clip 1.0. "
        f"PI, YaRN and NTK use factor {cfg.factor}"
        + "".join(f", {label(spec).removesuffix(' fine-tuned')} too" for spec in cfg.extra_baselines)
        + f"; CLEX uses max_factor {cfg.factor}, t' uniform on 1…{cfg.factor}, "
        + (f"position extrapolation in {cfg.chunks} contiguous chunks" if cfg.layout == "chunks"
           else "positions scattered over 0 … t'·L0 (the reference)")
        + f", the ODE's learning rate {cfg.clex_lr:g} and its gradients clipped on their own.",
        f"- Evaluation: {cfg.eval_samples} windows per length cut from the start of each held-out document long "
        "enough (the same windows for every row); CLEX picks t = ⌈n / L0⌉ (clamped at its max_factor).",
        "",
        "## Wall time",
        "",
        "| phase | seconds |",
        "| --- | --- |",
        *(f"| {name} | {secs:.0f} |" for name, secs in timings.items()),
        f"| total | {sum(timings.values()):.0f} |",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads).",
        "",
    ]
    demo = outdir.read(out)
    demo.write_text("report.md", "\n".join(lines))
    curves = {label: {k * cfg.L0: stats[0] for k, stats in by.items()}
              for label, by in summarise(cfg, records, cfg.eval_data[0]).items()}
    demo.write("ppl.png", lambda tmp: R.plot_ppl_curves(curves, cfg.L0, tmp, f"clex demo on {cfg.eval_data[0]}"))
    demo.write_text("results.json", json.dumps({"config": cfg.budget(), "records": records}, indent=2))
    return out / "report.md"
