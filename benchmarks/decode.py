"""Decoding speed as CLEX's t changes (not a test).

Decodes ``--new`` tokens greedily from a prompt of 3.5·L, so t (ceil policy) changes several times,
and reports tokens/s for: ``rerotate`` (clex's default: each cached key re-rotated once per change
of t), the reference's scheme (un-rotated keys, all re-rotated at every step; emulated with the
cache the tests check it with, ``tests/test_generate.py:UnrotatedCache``), ``recompute`` (prefill
again at every change of t), and vanilla RoPE on the same weights. Also the time per token in the
steps around n ≈ 8·L. One run, one model.

    python benchmarks/decode.py                  # tiny byte-level Llama, L = 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers as tf
from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import clex  # noqa: E402
from overhead import SHAPES  # noqa: E402
from test_generate import UnrotatedCache  # noqa: E402  (the reference's scheme, as the tests check it)


class StepClock:
    """Logits processor that timestamps every generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def decode(model, ids, new: int, policy: str | None, cache=None) -> tuple[float, list[float]]:
    clock = StepClock()
    kwargs = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
                  logits_processor=LogitsProcessorList([clock]))
    if cache is not None:
        kwargs[clex.cache.cache_kwarg(model)] = cache
    start = time.perf_counter()
    with torch.no_grad():
        if policy is None:
            model.generate(ids, **kwargs)
        else:
            clex.generate(model, ids, policy=policy, **kwargs)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(clock.times[:-1], clock.times[1:], strict=True)]
    return total, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--new", type=int, default=1024)
    parser.add_argument("--max-factor", type=int, default=16)
    parser.add_argument("--L", type=int, default=None, help="override the shape's context length L")
    parser.add_argument("--repeats", type=int, default=3, help="passes over all runs, interleaved; medians")
    args = parser.parse_args()
    cfg = tf.LlamaConfig(**{**SHAPES[args.shape], **({"max_position_embeddings": args.L} if args.L else {})})
    L = cfg.max_position_embeddings
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(cfg).eval()
    ours = tf.LlamaForCausalLM(tf.LlamaConfig.from_dict(cfg.to_dict())).eval()
    ours.load_state_dict(base.state_dict())
    clex.apply(ours, "clex", max_factor=args.max_factor)
    ids = torch.randint(0, cfg.vocab_size, (1, int(3.5 * L)), generator=torch.Generator().manual_seed(0))
    prompt = ids.shape[1]
    window = [i for i in range(args.new - 1) if 7.5 * L <= prompt + i + 1 <= 8.5 * L]

    runs = {
        "vanilla": lambda: decode(base, ids, args.new, None),
        "clex rerotate": lambda: decode(ours, ids, args.new, "rerotate"),
        "clex reference (re-rotate all keys every step)": lambda: decode(
            ours, ids, args.new, "off", UnrotatedCache(ours)
        ),
        "clex recompute": lambda: decode(ours, ids, args.new, "recompute"),
    }
    warnings.simplefilter("ignore")
    tf.utils.logging.set_verbosity_error()
    decode(base, ids, 8, None)  # warm-up
    totals: dict[str, list[float]] = {name: [] for name in runs}
    near: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            total, steps = fn()
            totals[name].append(total)
            near[name].append(statistics.median(steps[i] for i in window if i < len(steps)))
    results = {
        name: {"tokens_per_s": args.new / statistics.median(totals[name]),
               "ms_per_token_near_8L": 1e3 * statistics.median(near[name])}
        for name in runs
    }
    van = results["vanilla"]["ms_per_token_near_8L"]
    ref = results["clex reference (re-rotate all keys every step)"]["ms_per_token_near_8L"]
    end = prompt + args.new
    print(f"# {args.shape}: L = {L}, prompt {prompt} (3.5·L), {args.new} new tokens, ends at n = {end} "
          f"({end / L:.1f}·L); {torch.get_num_threads()} threads; medians of {args.repeats}")
    for name, r in results.items():
        near = r["ms_per_token_near_8L"]
        print(json.dumps({"run": name, **r, "time_per_token_vs_vanilla_near_8L": near / van,
                          "speedup_vs_reference_near_8L": ref / near}))


if __name__ == "__main__":
    main()
