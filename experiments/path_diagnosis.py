"""Why the learned path stays near NTK: how far Adam let the ODE move, how far it did move, and what
its gradients looked like beside the model's.

Per CLEX run (a glob of seed directories gives median (range) over seeds):

* **Adam's reach**: the sum of the ODE group's learning rate over the run (``clex_lr`` times the
  schedule's multipliers). Adam moves a weight by at most about its learning rate per step, so no ODE
  weight can end further than this from where it started;
* **moved**: the largest |W_down| at the end. W_down starts at 0 (the NTK path), so this is exactly
  how far the weight that moved most went; moved / reach near 1 means the ODE went as fast as Adam
  allowed in one direction (limited by the learning rate), near 0 that its gradients kept changing
  sign (nothing consistent to learn);
* the median gradient norms of the model and of the ODE before clipping (``metrics.jsonl``), and
  the share of steps whose ODE gradient was clipped;
* the path's largest departure from NTK, |log θ_learned(t) − log θ_ntk(t)| over pairs, at t = 8, 16;
* the mean training loss over the first and the last 50 steps with t' > 1 (where the ODE is used).

    python experiments/path_diagnosis.py 'runs/study-code/CLEX--lr-3e-4--max-factor-16-seed*' …
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from learned_path import rotary_deviation  # noqa: E402

import clex  # noqa: E402
from clex.training.step import cosine_schedule  # noqa: E402


def diagnose(run: Path) -> dict:
    args = json.loads((run / "train_args.json").read_text())
    clex_lr = args["lr"] if args["clex_lr"] is None else args["clex_lr"]
    _, multiplier = cosine_schedule(args["steps"], args["warmup"], args["clex_warmup"])
    reach = clex_lr * sum(multiplier(s) for s in range(args["steps"]))
    rot = clex.clex_modules(clex.from_pretrained(run))[0]
    ode = rot.clex_ode
    moved = float(ode.down_proj.detach().abs().max())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    used = [r for r in records if r.get("t", 1) > 1]  # at t' = 1 the ODE is not in the graph
    base = [r["grad_norm_base"] for r in records if "grad_norm_base" in r]
    ode_norms = [r["grad_norm_clex"] for r in used if "grad_norm_clex" in r]
    dev = rotary_deviation(rot, [8, 16])
    first, last = [statistics.mean(r["loss"] for r in part) for part in (used[:50], used[-50:])]
    return {"reach": reach, "moved": moved, "ratio": moved / reach if reach else float("nan"),
            "grad_base": statistics.median(base) if base else float("nan"),
            "grad_ode": statistics.median(ode_norms) if ode_norms else float("nan"),
            "clipped": sum(g > args["clex_max_grad_norm"] for g in ode_norms) / max(1, len(ode_norms)),
            **{f"dev{t}": float(d.abs().max()) for t, d in dev.items()},
            "loss_first": first, "loss_last": last}


def _cell(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)} … {format(max(values), fmt)})"


def main(patterns: list[str]) -> None:
    torch.set_grad_enabled(False)
    transformers.utils.logging.disable_progress_bar()
    cols = [("reach", ".2e"), ("moved", ".2e"), ("ratio", ".2f"), ("grad_base", ".3f"), ("grad_ode", ".2e"),
            ("clipped", ".0%"), ("dev8", ".3f"), ("dev16", ".3f"), ("loss_first", ".3f"),
            ("loss_last", ".3f")]
    print("| runs (seeds) | Adam's reach | max |W_down| | moved / reach | model grad norm | ODE grad norm "
          "| ODE clipped | max |Δ log θ| t=8 | t=16 | train loss, first 50 | last 50 |")
    print("| --- |" + " --- |" * len(cols))
    for pattern in patterns:
        runs = sorted(Path(p) for p in glob.glob(pattern))
        if not runs:
            raise SystemExit(f"no run matches {pattern!r}")
        rows = [diagnose(run) for run in runs]
        name = pattern.rsplit("/", 1)[-1].replace("-seed*", "")
        cells = [_cell([r[key] for r in rows], fmt) for key, fmt in cols]
        print(f"| {name} ({len(runs)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
