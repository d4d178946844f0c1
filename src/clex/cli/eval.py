"""``clex eval …``: perplexity and the generation-scored evaluations, thin over ``clex.eval``."""

from __future__ import annotations

import argparse
import contextlib

from clex.cli.chat import add_cache_mode
from clex.io.eval_run import PARTIAL
from clex.methods import BASE_LENGTH_HELP

OVERWRITE_HELP = ("replace the results clex wrote in --out (only files its manifest lists are removed; an --out "
                  "holding results is refused without it)")


def _check_counts(args: argparse.Namespace) -> None:
    """Counts that must be at least 1, refused before any work."""
    from clex.eval.common import check_positive

    for name in ("samples", "trials", "batch_size", "max_new_tokens", "limit", "key_digits"):
        value = getattr(args, name, None)
        if value is not None:
            if name == "limit" and isinstance(value, float):  # lm-eval: a fraction below 1
                if not value > 0:
                    raise ValueError(f"--limit must be positive, got {value!r}")
                continue
            check_positive(name, value)


@contextlib.contextmanager
def _eval_out(args: argparse.Namespace, kind: str, files: tuple[str, ...] = ()):
    """The command's --out, checked now (nothing written) and claimed once its arguments are valid."""
    from clex.io.eval_run import EvalOut

    _check_counts(args)
    with EvalOut(args.out, f"eval-{kind}", overwrite=args.overwrite, model=args.model, files=files) as dest:
        yield dest


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    """Perplexity against length for several methods on the same token windows."""
    from clex.data.tokens import parse_length
    from clex.data.types import DataError
    from clex.eval.ppl import evaluate_ppl, write_report
    from clex.eval.report import ppl_markdown
    from clex.methods import split_methods

    with _eval_out(args, "ppl", files=("results.json", "results.md", "ppl.png", "loss_by_position.png")) as dest:
        try:
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
                ready=dest.ready,
                base_length=args.base_length,
            )
        except (Exception, KeyboardInterrupt) as err:
            partial = getattr(err, "partial_report", None)
            if partial is None or not partial.results or dest.out is None:
                raise
            path = write_report(partial, dest.out, error=str(err) or type(err).__name__,
                                interrupted=isinstance(err, KeyboardInterrupt))  # the lengths that finished are kept
            if isinstance(err, KeyboardInterrupt):
                raise
            k = len(partial.results)
            raise DataError(f"{err}; the {k} result{'s' if k != 1 else ''} that finished {'are' if k != 1 else 'is'} "
                            f"in {path / 'results.json'}") from err
        out = write_report(report, dest.ready())
    print(ppl_markdown(report).split("\n\n| method | length")[0])
    print(f"\nwrote {out / 'results.json'}, results.md, ppl.png")
    return 0


def _task_run_args(args: argparse.Namespace, dest) -> dict:
    """Shared generation options; finished cells go to OUT/partial.jsonl, so a killed run resumes there."""
    from pathlib import Path

    return {"tokenizer": args.tokenizer, "cache_mode": args.cache_mode, "batch_size": args.batch_size,
            "dtype": args.dtype, "device": args.device, "show_progress": not args.no_progress,
            "resume_file": Path(args.out) / PARTIAL, "ready": dest.ready,
            "base_length": args.base_length}


def _task_out(args: argparse.Namespace, kind: str):
    report = ("results.json", "results.md", "predictions.jsonl", f"{kind}.png", f"{kind}_heatmap.png")
    return _eval_out(args, kind, files=(PARTIAL, *report))


def _finish_task(report, dest) -> int:
    from clex.eval.report import task_markdown
    from clex.eval.tasks import write_task_report

    out = dest.ready()
    path = write_task_report(report, out)
    if PARTIAL in out.files:
        out.remove(PARTIAL)  # the complete results.json replaces the checkpoint
    print(task_markdown(report).split("| method | task | length")[0].rstrip())
    print(f"\nwrote {path / 'results.json'}, results.md, predictions.jsonl, {report.kind}.png")
    return 0


def _lengths(text: str) -> list[int]:
    from clex.data.tokens import parse_length

    return [parse_length(x) for x in text.split(",") if x.strip()]


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    """Passkey retrieval accuracy by length × depth (prompts of exactly each length in the model's tokens)."""
    from clex.eval.retrieval import evaluate_passkey
    from clex.methods import split_methods

    with _task_out(args, "passkey") as dest:
        report = evaluate_passkey(args.model, split_methods(args.methods), _lengths(args.lengths), args.depths,
                                  args.trials, args.seed, args.key_digits, not args.no_intro,
                                  args.max_new_tokens or 12, **_task_run_args(args, dest))
        return _finish_task(report, dest)


def cmd_eval_niah(args: argparse.Namespace) -> int:
    """Needle in a haystack of real text: accuracy by length × depth, with a heatmap."""
    from clex.eval.retrieval import NIAH_NEEDLE, NIAH_QUESTION, evaluate_niah
    from clex.methods import split_methods

    with _task_out(args, "niah") as dest:
        report = evaluate_niah(args.model, split_methods(args.methods), _lengths(args.lengths), args.depths,
                               args.trials, args.seed, args.data, args.needle or NIAH_NEEDLE,
                               args.question or NIAH_QUESTION, args.answer, args.max_new_tokens or 16,
                               args.text_field, **_task_run_args(args, dest))
        return _finish_task(report, dest)


def cmd_eval_ruler(args: argparse.Namespace) -> int:
    """RULER-style synthetic suite (needles, variable tracking, word extraction, key-value), offline."""
    from clex.eval.ruler import evaluate_ruler
    from clex.methods import split_methods

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    with _task_out(args, "ruler") as dest:
        report = evaluate_ruler(args.model, split_methods(args.methods), _lengths(args.lengths), tasks, args.samples,
                                args.seed, args.data, **_task_run_args(args, dest))
        return _finish_task(report, dest)


def cmd_eval_longbench(args: argparse.Namespace) -> int:
    """LongBench-format records scored with LongBench's templates, middle truncation and metrics."""
    from clex.eval.longbench import evaluate_longbench
    from clex.methods import split_methods

    with _task_out(args, "longbench") as dest:
        report = evaluate_longbench(args.model, split_methods(args.methods), _lengths(args.lengths), args.data,
                                    args.dataset, args.chat, args.limit, **_task_run_args(args, dest))
        return _finish_task(report, dest)


def cmd_eval_harness(args: argparse.Namespace) -> int:
    """Run lm-evaluation-harness tasks on the model under each method (extra: clex-llm[lmeval])."""
    from clex.eval.harness import evaluate_harness, harness_markdown, write_harness
    from clex.methods import split_methods

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    with _eval_out(args, "lm-eval", files=("results.json", "results.md")) as dest:
        result = evaluate_harness(args.model, split_methods(args.methods), tasks, args.include_path, args.limit,
                                  args.num_fewshot, args.batch_size, args.max_length, args.tokenizer, args.dtype,
                                  args.device, ready=dest.ready, base_length=args.base_length)
        path = write_harness(result, dest.ready())
    print(harness_markdown(result))
    print(f"wrote {path / 'results.json'}, results.md")
    return 0


def add_eval_parsers(sub) -> None:
    """The ``eval`` subcommands."""
    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="evaluation", required=True)
    ppl = ev.add_parser("ppl", help=cmd_eval_ppl.__doc__, description=cmd_eval_ppl.__doc__)
    ppl.add_argument("--model", required=True, help="model directory (or hub name)")
    ppl.add_argument("--methods", default="vanilla,clex",
                     help="comma-separated methods with parameters, e.g. vanilla,pi:factor=8,yarn:factor=8,clex; "
                     "`clex` on a CLEX-trained model is its learned CLEX (default: %(default)s)")
    ppl.add_argument("--base-length", type=int, default=None, help=BASE_LENGTH_HELP)
    ppl.add_argument("--lengths", required=True, help="comma-separated lengths in tokens, k suffix allowed: 1k,2k,4k")
    ppl.add_argument("--data", default="sotu:test", help="sotu[:split], kjv[:split], code[:split], a "
                     ".txt/.jsonl/.parquet file or folder, or a hub dataset name (default: %(default)s)")
    ppl.add_argument("--samples", type=int, default=8, help="windows per length (default: %(default)s)")
    ppl.add_argument("--concat", action="store_true",
                     help="join documents into one stream before cutting windows (default: only documents at "
                     "least as long as the window, cut from their start)")
    ppl.add_argument("--stride", type=int, default=None, help="sliding-window mode with this stride")
    ppl.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
    ppl.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/hub data")
    ppl.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    ppl.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ppl.add_argument("--per-position", action="store_true", help="also plot the loss by position at the longest length")
    ppl.add_argument("--out", default="runs/eval-ppl", help="output directory (default: %(default)s)")
    ppl.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    ppl.add_argument("--no-progress", action="store_true", help="no progress bar")
    ppl.set_defaults(func=cmd_eval_ppl)

    _task_parsers(ev)


def _task_parsers(ev) -> None:
    """The generation-scored evaluations share the model, method, length and generation options."""
    from clex.eval.ruler import DEFAULT_TASKS

    def common(name: str, func, lengths_help: str) -> argparse.ArgumentParser:
        p = ev.add_parser(name, help=func.__doc__, description=func.__doc__)
        p.add_argument("--model", required=True, help="model directory (or hub name)")
        p.add_argument("--methods", default="vanilla,clex", help="comma-separated methods with parameters, as for "
                       "`clex eval ppl` (default: %(default)s)")
        p.add_argument("--lengths", required=True, help=lengths_help)
        p.add_argument("--base-length", type=int, default=None, help=BASE_LENGTH_HELP)
        p.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
        add_cache_mode(p, "while generating, as t grows")
        p.add_argument("--batch-size", type=int, default=8, help="prompts of equal length generated together")
        p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default: %(default)s)")
        p.add_argument("--out", default=f"runs/eval-{name}", help="output directory (default: %(default)s); a "
                       "killed run resumes from its OUT/partial.jsonl when re-run with the same settings")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=func)
        return p

    exact = "comma-separated prompt lengths in tokens (exact), k suffix allowed: 1k,2k,4k"
    pk = common("passkey", cmd_eval_passkey, exact)
    pk.add_argument("--depths", default="0,50,100", help="needle depths in percent (default: %(default)s)")
    pk.add_argument("--trials", type=int, default=5, help="random keys per length and depth (default: %(default)s)")
    pk.add_argument("--key-digits", type=int, default=5, help="digits of the pass key (default: %(default)s)")
    pk.add_argument("--no-intro", action="store_true", help="leave out the task line (for very short lengths)")
    pk.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default: 12)")

    nh = common("niah", cmd_eval_niah, exact)
    nh.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent (default: %(default)s)")
    nh.add_argument("--trials", type=int, default=3, help="needles per length and depth (default: %(default)s)")
    nh.add_argument("--data", default="sotu:test", help="haystack text, anything `clex eval ppl --data` takes "
                    "(default: %(default)s)")
    nh.add_argument("--text-field", default="text")
    nh.add_argument("--needle", default=None, help="needle sentence; {key} is a random number per trial "
                    "(default: 'The special magic number is {key}.')")
    nh.add_argument("--question", default=None, help="the question after the haystack (default asks for the number)")
    nh.add_argument("--answer", default=None, help="expected answer when the needle has no {key}")
    nh.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default: 16)")

    ru = common("ruler", cmd_eval_ruler, "comma-separated lengths in tokens: each prompt plus its answer budget fits")
    ru.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks (default: all)")
    ru.add_argument("--samples", type=int, default=5, help="samples per task and length (default: %(default)s)")
    ru.add_argument("--data", default="sotu:test", help="text of the essay haystacks (default: %(default)s)")

    lb = common("longbench", cmd_eval_longbench, "comma-separated window lengths: prompts are cut in the middle "
                "to fit with the answer budget")
    lb.add_argument("--data", required=True, help="LongBench-format .jsonl, or THUDM/LongBench:<dataset> (hub)")
    lb.add_argument("--dataset", default=None, help="LongBench dataset of records that do not name one")
    lb.add_argument("--chat", default="auto", choices=["auto", "on", "off"],
                    help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    lb.add_argument("--limit", type=int, default=None, help="at most this many records per dataset")

    lm = ev.add_parser("lm-eval", help=cmd_eval_harness.__doc__, description=cmd_eval_harness.__doc__)
    lm.add_argument("--model", required=True, help="model directory (or hub name)")
    lm.add_argument("--methods", default="clex", help="comma-separated methods (default: %(default)s)")
    lm.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    lm.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    lm.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if below 1)")
    lm.add_argument("--num-fewshot", type=int, default=None)
    lm.add_argument("--batch-size", type=int, default=1)
    lm.add_argument("--base-length", type=int, default=None, help=BASE_LENGTH_HELP)
    lm.add_argument("--max-length", type=int, default=None, help="lm-eval's context limit (default: the config's)")
    lm.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    lm.add_argument("--dtype", default="auto")
    lm.add_argument("--device", default=None)
    lm.add_argument("--out", default="runs/eval-lm-eval", help="output directory (default: %(default)s)")
    lm.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    lm.set_defaults(func=cmd_eval_harness)
