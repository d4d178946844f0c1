"""bf16 training-step cost of CLEX against vanilla, through `clex train` and through `CLEXTrainer`.

A SmolLM2-135M-shaped Llama (random weights, L = 8192) trained on 4,096-token rows of `sotu:train`
(byte ids), bf16 autocast, sdpa (and flash-attention 2 when `flash_attn` imports). Per path and
method: the median step time after the warm-up steps, tokens per second, peak GPU memory (on CPU
the process's peak RSS so far, so only a check), and CLEX / vanilla ratios measured in the same run.
One process, one GPU:

    python benchmarks/gpu_train_step.py                 # on the GPU machine (a few minutes)
    python benchmarks/gpu_train_step.py --tiny          # the same pipeline on CPU in seconds (a check)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
import clex  # noqa: E402
from clex import data as D  # noqa: E402
from clex.training import CLEXTrainer  # noqa: E402
from clex.training.loop import pack, train  # noqa: E402
from clex.training.options import TrainConfig
from clex.training.trainer import CLEXDataCollator
from overhead import SHAPES  # noqa: E402

METHODS = {"vanilla": "vanilla", "clex": "clex:max_factor=16"}


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def via_clex_train(model_dir: Path, out: Path, method: str, a) -> list[float]:
    cfg = TrainConfig(model=str(model_dir), out=str(out), method=method, data=a.data, tokenizer="bytes",
                      train_length=a.length, steps=a.steps, batch_size=a.batch_size, lr=1e-5, precision=a.precision,
                      gradient_checkpointing="on" if a.checkpointing else "off", show_progress=False)
    rows = [json.loads(line) for line in (train(cfg) / "metrics.jsonl").read_text().splitlines()]
    return [a.batch_size * a.length / r["tokens_per_s"] for r in rows]


class _Timer(tf.TrainerCallback):
    def __init__(self, device: str) -> None:
        self.device, self.times, self.began = device, [], 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kw):
        self._sync()
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        self.times.append(time.perf_counter() - self.began)


def via_trainer(model_dir: Path, out: Path, method: str, a, attn: str) -> list[float]:
    torch.manual_seed(0)
    model = clex.apply(clex.from_pretrained(model_dir, attn_implementation=attn), method)
    tok = D.load_tokenizer("bytes")
    samples = pack(D.tokenize_documents(D.load_documents(a.data), tok), a.length, None)
    rows = [{"input_ids": torch.as_tensor(s, dtype=torch.long)} for s in samples[: a.steps * a.batch_size]]
    args = tf.TrainingArguments(str(out), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                                learning_rate=1e-5, bf16=a.precision == "bf16", report_to=[], save_strategy="no",
                                logging_steps=10**6, disable_tqdm=True, use_cpu=a.device == "cpu",
                                **({"activation_checkpointing": True} if a.checkpointing else {}))
    timer = _Timer(a.device)
    trainer = CLEXTrainer(model=model, args=args, train_dataset=rows, data_collator=CLEXDataCollator(model),
                          callbacks=[timer])
    trainer.train()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on CPU in fp32: checks the pipeline")
    parser.add_argument("--steps", type=int, default=None, help="steps per configuration (default 12; tiny 3)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps left out of the median (default 2)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--length", type=int, default=None, help="tokens per row (default 4096; tiny 128)")
    parser.add_argument("--data", default="sotu:train")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    a = parser.parse_args()
    a.device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    a.precision = "fp32" if a.tiny else "bf16"
    a.steps = a.steps or (3 if a.tiny else 12)
    a.warmup_steps = a.warmup_steps if a.warmup_steps is not None else (1 if a.tiny else 2)
    a.batch_size = a.batch_size or (2 if a.tiny else 8)
    a.length = a.length or (128 if a.tiny else 4096)
    shape = {**SHAPES["tiny" if a.tiny else "smollm2"], "max_position_embeddings": 128 if a.tiny else 8192}
    # CLEX trains at its L: the rows' length is declared as the L the model extends from
    METHODS["clex"] = f"clex:max_factor=16,original_max_position_embeddings={a.length}"
    attns = ["sdpa"] + (["flash_attention_2"] if a.device == "cuda" and importlib.util.find_spec("flash_attn") else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        torch.manual_seed(0)
        tf.LlamaForCausalLM(tf.LlamaConfig(**shape)).save_pretrained(model_dir)
        for path in ["clex train", *(f"Trainer ({attn})" for attn in attns)]:
            for name, method in METHODS.items():
                reset_peak(a.device)
                out = Path(tmp) / f"{path}-{name}".replace(" ", "_").replace("(", "").replace(")", "")
                if path == "clex train":
                    times = via_clex_train(model_dir, out, method, a)
                else:
                    times = via_trainer(model_dir, out, method, a, path.split("(")[1].rstrip(")"))
                step = statistics.median(times[a.warmup_steps:] or times)
                results.append({"path": path, "method": name, "step_s": step,
                                "tokens_per_s": a.batch_size * a.length / step,
                                "peak_memory_mib": peak_memory_mib(a.device)})
    for r in results:
        ref = next(x for x in results if x["path"] == r["path"] and x["method"] == "vanilla")
        r["step_ratio_vs_vanilla"] = r["step_s"] / ref["step_s"]
        r["memory_ratio_vs_vanilla"] = r["peak_memory_mib"] / ref["peak_memory_mib"]
    device = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {device}; {'tiny' if a.tiny else 'SmolLM2-135M shape'}, {a.precision}, batch {a.batch_size} × "
          f"{a.length} tokens, {a.steps} steps (median after {a.warmup_steps})")
    print("| path | method | step (s) | tokens/s | peak memory (MiB) | step ÷ vanilla | memory ÷ vanilla |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['path']} | {r['method']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_memory_mib']:.0f} | {r['step_ratio_vs_vanilla']:.3f} | {r['memory_ratio_vs_vanilla']:.3f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": device, "args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
