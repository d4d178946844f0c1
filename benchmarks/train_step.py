"""Training-step cost: CLEX against vanilla, LoRA against full fine-tuning (not a test).

Each configuration runs the real training loop (`clex.train.train`) in its own process, so the
peak resident memory is its own; the step time is the median over the logged steps after the
first. The set of configurations runs twice, in opposite orders (ABBA), and the medians of both
passes are reported with the ratios against vanilla full fine-tuning.

    python benchmarks/train_step.py                 # tiny byte-level Llama, L = 128
    python benchmarks/train_step.py --shape smollm2 --steps 4 --train-length 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
from overhead import SHAPES  # noqa: E402

CONFIGS = {
    "vanilla full": dict(method="vanilla"),
    "clex full": dict(method="clex:max_factor=16"),
    "vanilla lora": dict(method="vanilla", lora="8,16,q_proj,v_proj"),
    "clex lora": dict(method="clex:max_factor=16", lora="8,16,q_proj,v_proj"),
}

CHILD = """
import json, resource, statistics, sys
from clex.training import TrainConfig, train
cfg = TrainConfig(**json.loads(sys.argv[1]))
out = train(cfg)
rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
secs = [r["tokens_per_s"] for r in rows[1:]]
print(json.dumps({"tokens_per_s": statistics.median(secs),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(config: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-length", type=int, default=None, help="default: the shape's L")
    parser.add_argument("--data", default="sotu:train")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPES[args.shape])).save_pretrained(model_dir)
        base = dict(model=str(model_dir), data=args.data, tokenizer="bytes", steps=args.steps,
                    batch_size=args.batch_size, train_length=args.train_length, lr=1e-4, show_progress=False,
                    gradient_checkpointing="off")
        results: dict[str, list[dict]] = {k: [] for k in CONFIGS}
        for order in (list(CONFIGS), list(reversed(CONFIGS))):
            for name in order:
                out = str(Path(tmp) / name.replace(" ", "-"))
                results[name].append(run({**base, **CONFIGS[name], "out": out, "overwrite": True}))
    ref = statistics.median(r["tokens_per_s"] for r in results["vanilla full"])
    print(f"# {args.shape}, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.steps} steps, ABBA")
    for name, runs in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        rss = statistics.median(r["peak_rss_mib"] for r in runs)
        print(json.dumps({"config": name, "tokens_per_s": tps, "time_ratio_vs_vanilla_full": ref / tps,
                          "peak_rss_mib": rss, "passes": [r["tokens_per_s"] for r in runs]}))


if __name__ == "__main__":
    main()
