"""``clex`` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import sys
import tempfile

from .methods import METHODS


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods and their parameters."""
    for m in METHODS.values():
        params = ", ".join([*m.required, *(f"{k}={v}" if v is not None else k for k, v in m.optional.items())])
        print(f"{m.name:9s} {m.summary}" + (f"\n{'':9s} parameters: {params}" if params else ""))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Show which method a saved model uses and its CLEX frequencies."""
    from .models import clex_modules, from_pretrained

    model = from_pretrained(args.model)
    config = model.config.get_text_config()
    print(f"model type: {config.model_type}")
    print(f"rope parameters: {config.rope_parameters}")
    for module in clex_modules(model):
        grid = module.trajectory()
        ratio = (grid[-1] / grid[0]).tolist()
        print(f"CLEX θ({module.config.max_factor}) / θ per pair: " + " ".join(f"{r:.3g}" for r in ratio))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Smallest end-to-end run until the `clex demo` issue lands: a tiny random Llama, every method,
    logits against vanilla inside the window, CLEX frequencies, and a save → load round trip."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from .models import apply, clex_modules

    hf_logging.disable_progress_bar()
    print("clex demo (placeholder: the paper-reproduction demo is a later issue). Tiny random Llama, L = 64.")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    vanilla = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 256))
    with torch.no_grad():
        ref, ref_short = vanilla(ids).logits, vanilla(ids[:, :64]).logits
    specs = ["pi:factor=4", "ntk:factor=4", "dynamic:factor=2", "yarn:factor=4", "llama3:factor=4", "clex"]
    print(f"{'method':18s} {'max|Δlogit| n≤L':>16s} {'max|Δlogit| n=4L':>17s}")
    for spec in specs:
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(vanilla.state_dict())
        apply(model, spec)
        with torch.no_grad():
            out, short = model(ids).logits, model(ids[:, :64]).logits
        inside = (short - ref_short).abs().max().item()
        print(f"{spec:18s} {inside:16.2e} {(out - ref).abs().max().item():17.2e}")
    clex_model = model
    grid = clex_modules(clex_model)[0].trajectory()
    ratios = " ".join(f"{x:.3f}" for x in grid[:, -1] / grid[0, -1])
    print("untrained CLEX θ(t)/θ for the slowest pair, t = 1…16:", ratios)
    with tempfile.TemporaryDirectory() as tmp:
        clex_model.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
        with torch.no_grad():
            diff = (reloaded(ids).logits - clex_model(ids).logits).abs().max().item()
    print(f"save → AutoModelForCausalLM.from_pretrained → max|Δlogit| = {diff:.1e}")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    """Perplexity against length for several methods on the same token windows."""
    from .data import parse_length
    from .eval.ppl import evaluate_ppl, write_report
    from .methods import split_methods
    from .report import ppl_markdown

    report = evaluate_ppl(
        args.model,
        split_methods(args.methods),
        [parse_length(x) for x in args.lengths.split(",") if x.strip()],
        data=args.data,
        samples=args.samples,
        tokenizer=args.tokenizer,
        mode="concat" if args.concat else "filter",
        stride=args.stride,
        dtype=args.dtype,
        device=args.device,
        text_field=args.text_field,
        per_position=args.per_position,
        show_progress=not args.no_progress,
    )
    out = write_report(report, args.out)
    print(ppl_markdown(report).split("\n\n| method | length")[0])
    print(f"\nwrote {out / 'results.json'}, results.md, ppl.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help=cmd_methods.__doc__).set_defaults(func=cmd_methods)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("--model", required=True, help="checkpoint directory (or hub name)")
    info.set_defaults(func=cmd_info)
    sub.add_parser("demo", help=cmd_demo.__doc__.splitlines()[0]).set_defaults(func=cmd_demo)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="evaluation", required=True)
    ppl = ev.add_parser("ppl", help=cmd_eval_ppl.__doc__, description=cmd_eval_ppl.__doc__)
    ppl.add_argument("--model", required=True, help="model directory (or hub name)")
    ppl.add_argument("--methods", default="vanilla,clex",
                     help="comma-separated methods with parameters, e.g. vanilla,pi:factor=8,yarn:factor=8,clex; "
                     "`clex` on a CLEX-trained model is its learned CLEX (default: %(default)s)")  # fmt: skip
    ppl.add_argument("--lengths", required=True, help="comma-separated lengths in tokens, k suffix allowed: 1k,2k,4k")
    ppl.add_argument("--data", default="sotu:test", help="sotu[:split], kjv[:split], a .txt/.jsonl/.parquet file or "
                     "folder, or a hub dataset name (default: %(default)s)")  # fmt: skip
    ppl.add_argument("--samples", type=int, default=8, help="windows per length (default: %(default)s)")
    ppl.add_argument("--concat", action="store_true",
                     help="join documents into one stream before cutting windows (default: only documents at "
                     "least as long as the window, cut from their start)")  # fmt: skip
    ppl.add_argument("--stride", type=int, default=None, help="sliding-window mode with this stride")
    ppl.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
    ppl.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/hub data")
    ppl.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    ppl.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ppl.add_argument("--per-position", action="store_true", help="also plot the loss by position at the longest length")
    ppl.add_argument("--out", default="runs/eval-ppl", help="output directory (default: %(default)s)")
    ppl.add_argument("--no-progress", action="store_true", help="no progress bar")
    ppl.set_defaults(func=cmd_eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"clex {args.command}: error: {err}", file=sys.stderr)
        return 2
