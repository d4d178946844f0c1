"""How far fine-tuning moved CLEX's learned frequency path from its start, NTK with α = 2t − 1.

For each fine-tuned CLEX run (a directory, or a glob of seed directories), prints
``log θ_learned(t) − log θ_ntk(t)`` per t, summarised over the fastest-rotating quarter of the
pairs, the slowest quarter, and the pair that moved most (signed: > 0 rotates faster than NTK; pair
0 is the fastest). Median (range) over seeds. It tests the diagnosis in the reproduction-study
issue: if the fastest pairs absorb the gap between neighbouring sampled training positions, their
log-frequencies move by about −ln t (PI-like compression).

    python experiments/learned_path.py 'runs/study/CLEX--lr-3e-4--max-factor-16-seed*' ...
"""

from __future__ import annotations

import copy
import glob
import math
import statistics
import sys

import torch
import transformers

import clex


def deviation(run: str, times: list[int]) -> dict[int, torch.Tensor]:
    """``log θ_learned(t) − log θ_ntk(t)`` per pair (fastest first) for each t up to the run's max_factor."""
    return rotary_deviation(clex.clex_modules(clex.from_pretrained(run))[0], times)


def rotary_deviation(rot, times: list[int]) -> dict[int, torch.Tensor]:
    """``deviation`` of one CLEX rotary module."""
    times = [t for t in times if t <= rot.settings.max_factor]
    ntk = copy.deepcopy(rot)
    with torch.no_grad():
        ntk.clex_ode.down_proj.zero_()  # W_down = 0 is exactly NTK with α = 2t − 1 (dynamics.py)
        return {t: (rot.frequencies(t).double().log() - ntk.frequencies(t).double().log()) for t in times}


def main(patterns: list[str]) -> None:
    times = [2, 4, 8, 16]
    transformers.utils.logging.disable_progress_bar()
    print("| runs (seeds) | t | −ln t | fastest quarter, mean | slowest quarter, mean | largest, signed | at pair |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for pattern in patterns:
        runs = sorted(glob.glob(pattern))
        if not runs:
            raise SystemExit(f"no run matches {pattern!r}")
        devs = [deviation(run, times) for run in runs]
        for t in devs[0]:
            quarter = devs[0][t].numel() // 4
            fast = [d[t][:quarter].mean().item() for d in devs]
            slow = [d[t][-quarter:].mean().item() for d in devs]
            top = [d[t][d[t].abs().argmax()].item() for d in devs]
            where = sorted(int(d[t].abs().argmax()) for d in devs)
            name = pattern.rsplit("/", 1)[-1].replace("-seed*", "")
            cells = [f"{name} ({len(runs)})", str(t), f"{-math.log(t):.2f}", _cell(fast), _cell(slow), _cell(top)]
            cells.append(str(where))
            print("| " + " | ".join(cells) + " |")


def _cell(values: list[float]) -> str:
    """Median (range) over seeds."""
    return f"{statistics.median(values):+.3f} ({min(values):+.3f} … {max(values):+.3f})"


if __name__ == "__main__":
    main(sys.argv[1:])
