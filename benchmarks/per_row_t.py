"""What giving every row its own t costs when the rows share one t (the common batch), measured in one run.

"Per-row" is clex as it is: each token's t from its own sequence's length (positions and attention mask).
"One t" is the rule it replaced, patched in for the comparison: t from the longest position of the batch. The
batch is left-padded, rows of different lengths that all fall in one t, so both rules compute the same
logits (checked) and only the bookkeeping differs. Runs are interleaved, alternating which rule goes first,
so drift hits both alike; medians. The rotary module's own call is timed too (the whole difference).

    python benchmarks/per_row_t.py                 # tiny model (worst case: the rotary module's share is largest)
    python benchmarks/per_row_t.py --shape smollm2 # SmolLM2-135M's shape
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers as tf

import clex
from clex.rotary import CLEXRotary

SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                 num_key_value_heads=6, max_position_embeddings=128),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    rope_theta=100000.0, tie_word_embeddings=True),
}


def one_t(self, position_ids):
    """The rule per-row t replaced: one t for the whole batch, from its longest position."""
    n = int(position_ids.max()) + 1
    t = float(self.t_override) if self.t_override is not None else self.scaling_factor(n)
    return (0.0 if t <= 1.0 and n <= self._short_below else t), n


def rotary_alone(model, shape, repeats: int, one_rule, per_row_rule) -> dict:
    """The rotary module's own call under each rule, at the prefill's shape and a decode step's (ms, medians):
    the whole difference between the rules, without the rest of the model's noise."""
    rot = clex.clex_modules(model)[0]
    x = torch.zeros(1)
    out = {}
    for name, (rows, length) in (("prefill", shape), ("decode", (shape[0], 1))):
        positions = torch.arange(length)[None].expand(rows, -1) + (shape[1] if length == 1 else 0)
        rot._attend = torch.ones(rows, length, dtype=torch.long)
        times = {"per-row": [], "one t": []}
        for r in range(repeats):
            rules = (("per-row", per_row_rule), ("one t", one_rule))
            for rule, impl in rules if r % 2 == 0 else rules[::-1]:
                CLEXRotary.token_factors = impl
                start = time.perf_counter()
                rot(x, positions)
                times[rule].append(time.perf_counter() - start)
        CLEXRotary.token_factors = per_row_rule
        rot._attend = None
        med = {rule: statistics.median(v) * 1e3 for rule, v in times.items()}
        out[name] = {"per_row_ms": med["per-row"], "one_t_ms": med["one t"], "ratio": med["per-row"] / med["one t"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = tf.LlamaConfig(**SHAPES[args.shape])
    config._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    clex.apply(model, "clex:max_factor=8")
    L = config.max_position_embeddings
    longest = 4 * L - args.new_tokens  # every row stays at t = 4 while generating
    lengths = [longest - 3 * i for i in range(args.batch)]
    ids = torch.randint(0, config.vocab_size, (args.batch, longest))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, longest - n :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    per_row = CLEXRotary.token_factors

    def forward():
        with torch.no_grad():
            return model(ids, attention_mask=mask, position_ids=positions).logits

    def generate():
        return clex.generate(model, ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                             min_new_tokens=args.new_tokens, pad_token_id=0)

    results = {}
    for name, fn in (("forward", forward), ("generate", generate)):
        times = {"per-row": [], "one t": []}
        outputs = {}
        for r in range(args.repeats):
            rules = (("per-row", per_row), ("one t", one_t))
            for rule, impl in rules if r % 2 == 0 else rules[::-1]:  # alternate which goes first
                CLEXRotary.token_factors = impl
                start = time.perf_counter()
                outputs[rule] = fn()
                times[rule].append(time.perf_counter() - start)
        CLEXRotary.token_factors = per_row
        assert torch.equal(outputs["per-row"], outputs["one t"]), "the rules disagree on a batch sharing one t"
        med = {rule: statistics.median(v) for rule, v in times.items()}
        results[name] = {"per_row_s": med["per-row"], "one_t_s": med["one t"],
                         "ratio": med["per-row"] / med["one t"]}
    results["rotary_module"] = rotary_alone(model, ids.shape, args.repeats * 20, one_t, per_row)
    print(json.dumps({"shape": args.shape, "batch": args.batch, "tokens": longest, "new_tokens": args.new_tokens,
                      "repeats": args.repeats, "machine": platform.machine(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, **results}, indent=1))


if __name__ == "__main__":
    main()
