"""`clex eval ppl` against a bare transformers loop, side by side in one run (not a test).

1. Throughput: tokens/s of ``evaluate_ppl`` (vanilla method) and of a plain
   ``model(ids, labels=ids)`` loop over the same windows; runs interleaved, medians.
2. Memory at the longest length: peak resident memory of one window's loss with full logits
   against clex's chunked loss, each in a fresh process (so peaks do not mix), above the memory
   the process had after loading the model.

    python benchmarks/eval_ppl.py                       # tiny byte-level Llama (a minute)
    python benchmarks/eval_ppl.py --shape smollm2 --length 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
from clex import data as D  # noqa: E402
from clex.eval import ppl as P  # noqa: E402
from overhead import SHAPES  # noqa: E402

tf.utils.logging.disable_progress_bar()


def build(shape: str, path: Path) -> None:
    cfg = tf.LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)


def throughput(model_dir: Path, length: int, samples: int, repeats: int, data: str) -> dict:
    docs = D.tokenize_documents(D.load_documents(data), D.ByteTokenizer())
    windows = D.make_windows(docs, length, samples)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()

    def bare() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for w in windows:
                ids = torch.as_tensor(w, dtype=torch.long)[None]
                model(ids, labels=ids)
        return time.perf_counter() - start

    def ours() -> float:
        report = P.evaluate_ppl(model_dir, ["vanilla"], [length], data=data, samples=samples,
                                tokenizer="bytes", show_progress=False)
        return report.results[0].seconds

    ours()  # warm-up (and the token cache)
    bare()
    t_ours, t_bare = [], []
    for _ in range(repeats):
        t_ours.append(ours())
        t_bare.append(bare())
    tokens = len(windows) * length
    return {
        "length": length, "windows": len(windows), "repeats": repeats,
        "tokens_per_s_clex": tokens / statistics.median(t_ours),
        "tokens_per_s_bare": tokens / statistics.median(t_bare),
        "ratio": statistics.median(t_bare) / statistics.median(t_ours),
    }


def peak_memory(model_dir: Path, length: int, mode: str) -> dict:
    """Run in a child process: peak RSS growth of one window's loss, full logits or chunked."""
    code = f"""
import json, resource, torch, transformers as tf
from clex.eval import ppl as P
tf.utils.logging.disable_progress_bar()
model = tf.AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, attn_implementation="sdpa").eval()
ids = torch.randint(0, model.config.vocab_size, (1, {length}), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(ids[:, :16])  # warm-up, small
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    if {mode!r} == "full":
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
    else:
        loss = P.window_nll(model, ids)[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"mode": {mode!r}, "loss": loss, "peak_growth_mib": (peak - base) / 1024, "peak_mib": peak / 1024}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--length", type=int, default=1024, help="window length for throughput")
    parser.add_argument("--memory-length", type=int, default=8192, help="window length for the memory test")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="sotu:test")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; shape {args.shape}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build(args.shape, model_dir)
        res = throughput(model_dir, args.length, args.samples, args.repeats, args.data)
        print(json.dumps(res))
        print(f"throughput at {res['length']} tokens × {res['windows']} windows: clex {res['tokens_per_s_clex']:.0f} "
              f"tok/s, bare loop {res['tokens_per_s_bare']:.0f} tok/s, ratio {res['ratio']:.3f} (median of "
              f"{res['repeats']})")
        full = peak_memory(model_dir, args.memory_length, "full")
        chunked = peak_memory(model_dir, args.memory_length, "chunked")
        print(json.dumps(full))
        print(json.dumps(chunked))
        print(f"peak memory growth for one {args.memory_length}-token window: full logits "
              f"{full['peak_growth_mib']:.0f} MiB, chunked {chunked['peak_growth_mib']:.0f} MiB "
              f"(losses {full['loss']:.4f} / {chunked['loss']:.4f})")


if __name__ == "__main__":
    main()
