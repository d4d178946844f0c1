"""What long context is worth on a corpus: each window's perplexity with its whole context against the
same tokens scored with only the last L0 tokens of context.

For each length n = k·L0 (default k = 1, 4, 16), the evaluation windows of ``clex eval ppl`` (the same
``samples`` windows of n tokens) are scored twice by the same model under the same method:

* **full**: one forward pass over the window, every token sees all tokens before it in the window;
* **last L0**: a sliding window of L0 tokens moved by ``stride`` (default L0/8) over the same window,
  each token scored once, so every token sees between L0 − stride and L0 tokens before it (the first
  L0 tokens of the window see exactly what they see in the full pass). Positions stay 0 … L0−1, where
  every method equals its 1× self.

The worth of the context is ``ppl(last L0) / ppl(full) − 1``: 0 at k = 1 by construction (a check),
and how much the tokens beyond the last L0 help at k > 1.

    python experiments/context_value.py --data code:validation runs/study-code/clex-…-seed0=clex …
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from clex import data as D
from clex.eval.common import model_for_method, model_tokenizer_config
from clex.eval.ppl import evaluate_windows
from clex.loading import load_config
from clex.models import training_length


def context_value(model: str, method: str, data: str, factors: list[int], samples: int, stride: int | None,
                  tokenizer: str | None = "bytes") -> dict:
    """``{k: {"full": ppl, "last_L0": ppl, "worth": ratio − 1, "tokens": n}}`` for one (model, method)."""
    L0 = training_length(load_config(model))
    stride = stride or max(1, L0 // 8)
    tok, _ = model_tokenizer_config(model, tokenizer)
    docs = D.tokenize_documents(D.load_documents(data), tok)
    m = model_for_method(model, method, torch.float32, "cpu")
    out = {}
    for k in factors:
        windows = D.make_windows(docs, k * L0, samples)
        full_nll, full_n, _ = evaluate_windows(m, windows)
        if k == 1:
            short_nll, short_n = full_nll, full_n
        else:
            short_nll, short_n, _ = evaluate_windows(m, windows, stride=stride, length=L0)
        if short_n != full_n:
            raise RuntimeError(f"scored {short_n} tokens with L0 context but {full_n} with full context")
        full, short = math.exp(full_nll / full_n), math.exp(short_nll / short_n)
        out[k] = {"full": full, "last_L0": short, "worth": short / full - 1, "tokens": full_n, "windows": len(windows)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="MODEL_DIR=METHOD (e.g. runs/x/clex-seed0=clex)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--factors", default="1,4,16")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--stride", type=int, default=None, help="sliding-window stride (default L0/8)")
    ap.add_argument("--tokenizer", default="bytes", help="'bytes' (default) or 'model' for the model's own")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    factors = [int(x) for x in args.factors.split(",")]
    tokenizer = None if args.tokenizer == "model" else args.tokenizer
    results, began = {}, time.perf_counter()
    for item in args.models:
        model, _, method = item.partition("=")
        results[item] = context_value(model, method or "vanilla", args.data, factors, args.samples, args.stride,
                                      tokenizer)
        print(f"{item}: {time.perf_counter() - began:.0f} s so far", file=sys.stderr, flush=True)
    head = "| model | " + " | ".join(f"{k}× full | {k}× last L0 | {k}× worth" for k in factors) + " |"
    lines = [f"`{args.data}`, {args.samples} windows per length, PPL per token; worth = last-L0 / full − 1", "",
             head, "| --- |" + " --- |" * (3 * len(factors))]
    for item, per_k in results.items():
        cells = [f"{r['full']:.3f} | {r['last_L0']:.3f} | {100 * r['worth']:+.1f}%" for r in map(per_k.get, factors)]
        lines.append(f"| {item} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"data": args.data, "samples": args.samples, "stride": args.stride,
                                              "seconds": time.perf_counter() - began, "results": results}, indent=2))


if __name__ == "__main__":
    main()
