"""Throughput of clex's vLLM plugin against the same export served by vLLM without it, same requests, one run.

Each side runs in its own vLLM process (the plugin is loaded per process), so the processes alternate —
plugin, stock, stock, plugin, … — and the ratio is of the medians over all their timed repeats; a single pair of
processes varies by more than the plugin's own cost (the per-step offset of each token's position). Needs the
vLLM virtualenv of ``make test-engines`` and its prepared export (.engines/work).

    python benchmarks/vllm_plugin_throughput.py --T 2 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".engines" / "work"
PYTHON = ROOT / ".engines" / "vllm" / "bin" / "python"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()
    exports = sorted(WORK.glob(f"clex-L{args.L}-s*-longrope-T{args.T}"))
    if not PYTHON.exists() or not exports:
        print(f"skipped: needs {PYTHON} and an export in {WORK} (run make test-engines first)")
        return 0
    sys.path.insert(0, str(ROOT / "engines"))
    from per_request_t import make_job

    ids = json.loads(next(WORK.glob(f"job-plugin-plugin-T{args.T}.json")).read_text())["ids"]
    job = make_job(str(exports[-1]), ids, args.L, args.T)
    (WORK / "bench-throughput-job.json").write_text(json.dumps(job))
    rates: dict[str, list[float]] = {"plugin": [], "stock": []}
    for i in range(2 * args.pairs):
        side = "plugin" if i % 4 in (0, 3) else "stock"  # plugin, stock, stock, plugin, …: order effects cancel
        env = {**os.environ, **({"VLLM_PLUGINS": ""} if side == "stock" else {})}
        out = WORK / f"bench-throughput-{side}.json"
        t0 = time.perf_counter()
        cmd = [str(PYTHON), str(ROOT / "engines" / "run_vllm_plugin.py"), str(WORK / "bench-throughput-job.json"),
               str(out), "--throughput"]
        subprocess.run(cmd, env=env, check=True, cwd=WORK, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = json.loads(out.read_text())
        assert got["plugin"] == (side == "plugin")
        rates[side] += got["tok_s"]
        print(f"{side}: {', '.join(f'{x:.0f}' for x in got['tok_s'])} tok/s ({time.perf_counter() - t0:.0f} s)")
    ratio = statistics.median(rates["plugin"]) / statistics.median(rates["stock"])
    print(f"T = {args.T}, {args.pairs} process pairs: plugin median {statistics.median(rates['plugin']):.0f}, "
          f"stock median {statistics.median(rates['stock']):.0f} tok/s; ratio {ratio:.3f} (target >= 0.95)")
    return 0 if ratio >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
