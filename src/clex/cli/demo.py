"""``clex demo``: the paper's experiment end to end on a laptop CPU, in resumable phases.

1. pre-train a tiny byte-level Llama with plain RoPE at a short length L0 on ``sotu:train``;
2. fine-tune it with CLEX, PI, YaRN and NTK — same steps, batch and learning rate, all at L0;
3. evaluate perplexity at 1×…16× L0 on ``sotu:test`` (and any ``extra_data``), with the base model
   under vanilla RoPE and under untrained CLEX as references;
4. write ``report.md`` and ``ppl.png`` with a verdict computed from the numbers.

Every phase is ``clex train`` / ``clex eval ppl`` under the hood, and writes its result in its own
directory of ``out``; a re-run skips finished phases and resumes a half-done training run from its
last checkpoint. The defaults come from the measurements in docs/reproduction.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from clex.cli.demo_report import BASELINE_NAMES, label, verdict, write_demo_report
from clex.eval.ppl import evaluate_ppl
from clex.io import outdir
from clex.io.train_run import ARGS_FILE, checkpoints, finished
from clex.jsonfile import read_json
from clex.methods import parse_method
from clex.training.loop import Interrupted, train
from clex.training.options import TrainConfig

CONFIG_FILE = "demo_config.json"
TIMINGS_FILE = "timings.json"


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0  # pre-training seed; fine-tuning seeds are seed, seed + 1, …
    seeds: int = 1  # fine-tuning runs per method (the table shows median and range)
    train_data: str = "sotu:train"
    eval_data: tuple[str, ...] = ("sotu:test",)
    # the base model: byte-level Llama with plain RoPE at L0
    L0: int = 128
    layers: int = 4
    hidden: int = 192
    heads: int = 6
    intermediate: int = 512
    pretrain_steps: int = 1000
    pretrain_lr: float = 1e-3
    batch_size: int = 16
    # fine-tuning, the same budget for every method
    finetune_steps: int = 500
    lr: float = 3e-4  # better than 1e-4 for CLEX and YaRN alike (docs/reproduction.md, sweeps 1–2)
    factor: int = 16  # PI / YaRN / NTK scaling factor and CLEX's max_factor: the same range for all
    # more fine-tuned baselines at L0 beside PI/YaRN/NTK ×factor. YaRN ×8 is tuned for half CLEX's range
    # and is the best baseline at 4× and 8× in the study: the verdict judges CLEX against it too.
    extra_baselines: tuple[str, ...] = ("yarn:factor=8",)
    clex_lr: float = 1e-5  # the ODE's own learning rate, clipped on its own (docs/design.md §6)
    layout: str = "chunks"  # CLEX's training positions: 2 contiguous runs with a random skip
    chunks: int = 2
    # evaluation
    eval_factors: tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_samples: int = 32  # windows per length, the same for every row
    save_every: int = 100

    def __post_init__(self) -> None:
        for name in ("seeds", "L0", "pretrain_steps", "finetune_steps", "batch_size", "eval_samples", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"demo setting {name} must be a positive integer, got {value!r}")
        if not isinstance(self.factor, int) or self.factor < 2:
            raise ValueError(f"demo setting factor must be an integer >= 2, got {self.factor!r}")
        if not self.eval_factors or any(not isinstance(k, int) or k < 1 for k in self.eval_factors):
            raise ValueError(f"eval_factors must be positive integers, got {self.eval_factors!r}")
        for spec in self.extra_baselines:
            name, params = parse_method(spec)
            if name not in BASELINE_NAMES or set(params) != {"factor"} or not isinstance(params["factor"], int):
                raise ValueError(f"extra baseline {spec!r} must be pi, yarn or ntk with an integer factor only, "
                                 "e.g. yarn:factor=8")
            if params["factor"] == self.factor:
                raise ValueError(f"extra baseline {spec!r} repeats a main one (factor {self.factor})")

    def budget(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "out"}


QUICK = dict(L0=64, layers=2, hidden=64, heads=4, intermediate=128, pretrain_steps=150, pretrain_lr=2e-3,
             batch_size=8, finetune_steps=30, lr=3e-4, factor=8, extra_baselines=(), eval_factors=(1, 2, 4, 8),
             eval_samples=6, save_every=50)


def quick_config(**overrides) -> DemoConfig:
    """The ``--quick`` pipeline (about 10 s on 2 cores): same phases, a smaller model and budget."""
    return DemoConfig(**{"out": "runs/demo-quick", **QUICK, **overrides})


@dataclass
class Phase:
    name: str
    title: str
    units: float  # estimated cost in pre-training-step equivalents
    run: Callable[[], object] = field(repr=False)


# --- the phases ---------------------------------------------------------------------------------
def finetune_methods(cfg: DemoConfig) -> dict[str, str]:
    """Run name → method spec of every fine-tuned model (CLEX, the baselines ×factor, the extra ones)."""
    f = cfg.factor
    methods = {"clex": f"clex:max_factor={f}", **{name: f"{name}:factor={f}" for name in BASELINE_NAMES}}
    for spec in cfg.extra_baselines:
        name, params = parse_method(spec)
        methods[f"{name}{params['factor']}"] = spec
    return methods


def _model_config(cfg: DemoConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=cfg.L0,
        rope_theta=10000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def train_run(run_dir: Path, tokenizer: str | None = "bytes", **kwargs) -> None:
    """One ``clex train`` run; continues a half-done run in ``run_dir`` from its last checkpoint.
    ``tokenizer=None`` uses the model directory's own (a study's BPE base)."""
    if finished(run_dir):
        return
    resume = (run_dir / ARGS_FILE).exists()
    train(TrainConfig(out=str(run_dir), tokenizer=tokenizer, resume=resume, keep=1, **kwargs))
    run = outdir.read(run_dir)
    for checkpoint in checkpoints(run_dir):  # the final model is saved: free the optimizer states
        if run.holds(checkpoint.name):
            run.remove(checkpoint.name)


def pretrain(cfg: DemoConfig, out: Path, tokenizer: str | None = "bytes", show_progress: bool = True) -> None:
    """Pre-train ``out/base`` from ``out/init``, a fresh byte-level model unless one is there already
    (a study's BPE model, with ``tokenizer=None`` to use its own tokenizer)."""
    from transformers import LlamaForCausalLM

    init = out / "init"
    if not (init / "config.json").exists():
        torch.manual_seed(cfg.seed)
        outdir.place_dir(init, LlamaForCausalLM(_model_config(cfg)).save_pretrained)
    outdir.nest(out, "base", "train")
    train_run(out / "base", model=str(init), method="vanilla", data=cfg.train_data, steps=cfg.pretrain_steps,
              batch_size=cfg.batch_size, lr=cfg.pretrain_lr, seed=cfg.seed, save_every=cfg.save_every,
              tokenizer=tokenizer, show_progress=show_progress)


def finetune(cfg: DemoConfig, out: Path, name: str, seed: int, show_progress: bool = True) -> None:
    spec = finetune_methods(cfg)[name]
    extra = dict(clex_lr=cfg.clex_lr, layout=cfg.layout, chunks=cfg.chunks) if name == "clex" else {}
    runs = out / "finetuned"
    outdir.nest(runs, f"{name}-seed{seed}", "train")  # recorded before it is written, as the demo's
    train_run(runs / f"{name}-seed{seed}", model=str(out / "base"), method=spec, data=cfg.train_data,
              steps=cfg.finetune_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, save_every=cfg.save_every,
              show_progress=show_progress, **extra)


def rows(cfg: DemoConfig, out: Path) -> list[tuple[str, str, str, int | None]]:
    """(label, model directory, method, fine-tuning seed) for every evaluated row."""
    top = max(cfg.eval_factors)
    base = str(out / "base")
    table = [("vanilla RoPE, no fine-tuning", base, "vanilla", None),
             ("CLEX untrained (NTK α=2t−1), no fine-tuning", base, f"clex:max_factor={max(top, 2)}", None)]
    for name, spec in finetune_methods(cfg).items():
        for seed in _ft_seeds(cfg):
            model = str(out / "finetuned" / f"{name}-seed{seed}")
            # as trained: a baseline's own rope is the model's as shipped ("vanilla"); its spec applied again would
            # scale on top of it (factor², see docs/design.md §8); CLEX's learned path is "clex"
            table.append((label(spec), model, "clex" if name == "clex" else "vanilla", seed))
    return table


def _ft_seeds(cfg: DemoConfig) -> list[int]:
    return [cfg.seed + i for i in range(cfg.seeds)]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def cached_ppl(model: str, method: str, lengths: list[int], data: str, samples: int, path: Path,
               tokenizer: str | None = "bytes") -> dict:
    """``{"ppl": {length: perplexity}, "seconds": …}`` of one (model, method), cached as JSON at ``path``
    (written atomically: an interrupted run never leaves half a file). Lengths missing from the cache are
    evaluated and added; every length's windows are independent of the others."""
    result = read_json(path) if path.exists() else {"ppl": {}, "seconds": 0.0}
    if not (isinstance(result.get("ppl"), dict) and isinstance(result.get("seconds"), int | float)
            and all(isinstance(v, int | float) for v in result["ppl"].values())):
        raise ValueError(f"{path} is not a perplexity cache of clex's (it lacks 'ppl' or 'seconds'); move it away")
    missing = [n for n in lengths if str(n) not in result["ppl"]]
    if missing:
        report = evaluate_ppl(model, [method], missing, data=data, samples=samples, tokenizer=tokenizer,
                              show_progress=False)
        result["ppl"].update({str(r.length): r.ppl for r in report.results})
        result["seconds"] += sum(r.seconds for r in report.results)
        text = json.dumps(result, indent=2)
        outdir.write_in(path, lambda tmp: tmp.write_text(text))
    return {"ppl": {str(n): result["ppl"][str(n)] for n in lengths}, "seconds": result["seconds"]}


def evaluate_row(cfg: DemoConfig, out: Path, data: str, row) -> dict:
    """Perplexity of one row (label, model, method, seed) at every length of the demo."""
    label, model, method, seed = row
    path = outdir.nest(outdir.nest(out, "eval", "demo"), slug(data), "demo") / f"{Path(model).name}-{slug(method)}.json"
    lengths = [k * cfg.L0 for k in cfg.eval_factors]
    result = cached_ppl(model, method, lengths, data, cfg.eval_samples, path)
    return {"label": label, "model": model, "method": method, "seed": seed, "data": data,
            "ppl": result["ppl"], "seconds": result["seconds"]}


# --- the run ------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, overwrite: bool = False, log=print, show_progress: bool = True) -> Path:
    """Run (or continue) every phase; returns the output directory holding report.md. ``show_progress``: the
    training runs' progress bars (shown only on a terminal either way)."""
    out = Path(cfg.out)
    demo_dir = _check_config(cfg, out, overwrite)
    timings = read_json(out / TIMINGS_FILE) if demo_dir.holds(TIMINGS_FILE) else {}
    timings = {k: v for k, v in timings.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    ft_units = cfg.finetune_steps * 1.05  # a CLEX step costs about 5% more (benchmarks/train_step.py)
    eval_units = sum(cfg.eval_factors) * cfg.eval_samples / 48 + 5  # forward only, plus loading the model
    phases = [Phase("pretrain", f"pre-train the base model ({cfg.pretrain_steps} steps at L0 = {cfg.L0})",
                    cfg.pretrain_steps, lambda: pretrain(cfg, out, show_progress=show_progress))]
    for seed in _ft_seeds(cfg):
        for name in finetune_methods(cfg):
            phases.append(Phase(f"finetune {name} seed {seed}", f"fine-tune {name} (seed {seed}, "
                                f"{cfg.finetune_steps} steps)", ft_units,
                                lambda name=name, seed=seed: finetune(cfg, out, name, seed, show_progress)))
    records: list[dict] = []
    for data in cfg.eval_data:
        for row in rows(cfg, out):
            seed = f" (seed {row[3]})" if row[3] is not None else ""
            phases.append(Phase(f"eval {data} {row[0]}{seed}", f"evaluate {row[0]}{seed} on {data}", eval_units,
                                lambda data=data, row=row: records.append(evaluate_row(cfg, out, data, row))))
    seconds_per_unit = None
    for i, phase in enumerate(phases, 1):
        left = sum(p.units for p in phases[i - 1 :]) * (seconds_per_unit or 0.2)
        log(f"[{i}/{len(phases)}] {phase.title} — about {_minutes(left)} left")
        began = time.perf_counter()
        try:
            phase.run()
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted during '{phase.title}'; run the same command again to continue "
                              "where it stopped") from None
        spent = time.perf_counter() - began
        if spent > 5 and phase.name.startswith(("pretrain", "finetune")):  # measured, not resumed from cache
            seconds_per_unit = spent / phase.units
        timings[phase.name] = timings.get(phase.name, 0.0) + spent
        demo_dir.write_text(TIMINGS_FILE, json.dumps(timings, indent=2))
    path = write_demo_report(cfg, out, records, timings)
    log(f"wrote {path} and {out / 'ppl.png'}")
    log(verdict(cfg, records)[0])
    return out


DEMO_FILES = (CONFIG_FILE, TIMINGS_FILE, "init", "base", "finetuned", "eval", "report.md", "ppl.png", "results.json")


def _check_config(cfg: DemoConfig, out: Path, overwrite: bool) -> outdir.OutDir:
    """Claim ``out`` for the demo. Its settings must be those of the run already there (held-out data may be
    added: it changes no training); ``overwrite`` removes only what the demo wrote."""
    if out.is_dir() and not (out / outdir.MANIFEST).exists() and (out / CONFIG_FILE).exists():
        raise ValueError(f"{out} holds a demo from an older clex without a manifest (its checkpoints are pickles, "
                         "which clex no longer reads); move it aside or choose another --out")
    wanted = json.loads(json.dumps(cfg.budget()))
    existing = outdir.claim(out, "demo", dry_run=True)
    if existing is not None and existing.holds(CONFIG_FILE):
        try:
            previous = read_json(out / CONFIG_FILE)
        except (OSError, ValueError):
            previous = None
        training = lambda c: {k: v for k, v in (c or {}).items() if k != "eval_data"}  # noqa: E731
        if training(previous) != training(wanted) and not overwrite:
            raise ValueError(f"{out} holds a demo run with other settings; use another --out, or --overwrite "
                             "(removes only what the demo wrote there)")
        overwrite = overwrite and training(previous) != training(wanted)
    demo_dir = outdir.claim(out, "demo", overwrite=overwrite)
    demo_dir.check_free(*DEMO_FILES)
    demo_dir.sub("finetuned", "demo")  # a directory of runs, each cleaned through its own manifest on --overwrite
    demo_dir.write_text(CONFIG_FILE, json.dumps(wanted, indent=2))
    return demo_dir


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def with_overrides(cfg: DemoConfig, **kwargs) -> DemoConfig:
    return replace(cfg, **{k: v for k, v in kwargs.items() if v is not None})
