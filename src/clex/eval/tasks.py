"""Generation-scored evaluations (passkey, needle, RULER, LongBench): one runner, one report.

A task is a list of :class:`Sample` (prompt token ids, reference answers, how many tokens to
generate, and the cells of the result table it belongs to) and a scoring function. The runner loads
the model once per method (``model_for_method``, as ``clex eval ppl`` does), generates greedily
through ``clex.generate`` (so CLEX's t follows the length as the sequence grows past the prompt),
batching samples whose prompts have the same length, and scores every answer. Results are one row
per (method, cell) with the mean score in [0, 1]; predictions are kept for inspection.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from clex import data as D
from clex.errors import NonFiniteLogits
from clex.eval.common import check_positive, dtype_of, model_for_method, model_tokenizer_config, resolve_device
from clex.eval.resume import Checkpoint, run_key
from clex.generation import eos_ids, generate, pad_id, refuse_nan, until_eos
from clex.io.progress import progress_bar
from clex.models import training_length


@dataclass
class Sample:
    """One prompt: ``ids`` are fed as they are (never re-tokenized), so lengths are exact."""

    ids: list[int]
    answers: list[str]
    max_new_tokens: int
    task: str  # the table the sample is scored in (e.g. "passkey", "niah_single", "hotpotqa")
    length: int  # the length bucket it belongs to (requested length, or LongBench's max length)
    depth: float | None = None  # needle depth in percent, where the task has one
    metric: str = "accuracy"
    extra: dict = field(default_factory=dict)  # what the scorer needs (all_classes, the key …)
    stop_strings: tuple[str, ...] = ()  # also stop generating at these (e.g. "\n" for samsum)


@dataclass
class TaskRow:
    method: str
    task: str
    length: int
    depth: float | None
    metric: str
    score: float  # mean over samples, in [0, 1]
    samples: int
    prompt_tokens: float  # mean prompt length of the samples in this cell
    seconds: float


@dataclass
class TaskReport:
    kind: str  # passkey, niah, ruler, longbench
    model: str
    training_length: int
    methods: list[str]
    lengths: list[int]
    settings: dict
    rows: list[TaskRow] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)

    def table(self, task: str | None = None) -> dict[str, dict[int, float]]:
        """method → length → mean score over every sample (all depths) of ``task`` (or of all tasks, averaging
        the per-task means, as RULER's average does)."""
        per: dict[tuple[str, int, str], list[tuple[float, int]]] = {}
        for r in self.rows:
            if task is None or r.task == task:
                per.setdefault((r.method, r.length, r.task), []).append((r.score, r.samples))
        task_means: dict[tuple[str, int], list[float]] = {}
        for (m, n, _), cells in per.items():
            total = sum(k for _, k in cells)
            task_means.setdefault((m, n), []).append(sum(s * k for s, k in cells) / total)
        out: dict[str, dict[int, float]] = {}
        for (m, n), means in task_means.items():
            out.setdefault(m, {})[n] = float(np.mean(means))
        return out

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r.task for r in self.rows))

    def depths(self) -> list[float]:
        return sorted({r.depth for r in self.rows if r.depth is not None})


ScoreFn = Callable[[str, Sample], float]


def greedy_answers(
    model, tokenizer, samples: Sequence[Sample], cache_mode: str = "rerotate", batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of every sample's prompt (decoded, special tokens skipped), in order.

    Samples with equal prompt length and token budget are generated together (no padding needed).
    """
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, model)
    groups: dict[tuple[int, int, tuple[str, ...]], list[int]] = {}
    for i, s in enumerate(samples):
        if not s.ids:
            raise D.DataError(f"sample {i} of task {s.task!r} has an empty prompt")
        groups.setdefault((len(s.ids), s.max_new_tokens, s.stop_strings), []).append(i)
    out: list[str] = [""] * len(samples)
    for (n, new, stops), members in groups.items():
        for a in range(0, len(members), batch_size):
            chunk = members[a : a + batch_size]
            ids = torch.tensor([samples[i].ids for i in chunk], dtype=torch.long, device=device)
            hf_stops = stops and not isinstance(tokenizer, D.ByteTokenizer)
            kwargs = {"stop_strings": list(stops), "tokenizer": tokenizer} if hf_stops else {}
            with torch.no_grad():
                seqs = generate(model, ids, cache_mode, max_new_tokens=new, do_sample=False, pad_token_id=pad,
                                eos_token_id=eos or None, attention_mask=torch.ones_like(ids),
                                logits_processor=LogitsProcessorList([refuse_nan]), **kwargs)
            for i, row in zip(chunk, seqs[:, n:].tolist(), strict=True):
                out[i] = _cut(D.decode(tokenizer, until_eos(row, eos)), stops)
            if progress:
                progress(len(chunk))
    return out


def _cut(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop string (generation may run past it by a token or, for byte
    tokenizers, which ``generate``'s stop strings do not support, to the end of the budget)."""
    for stop in stops:
        text = (text.lstrip(stop) if not stop.strip() else text).split(stop, 1)[0]
    return text


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (a BOS token, or nothing)."""
    if isinstance(tokenizer, D.ByteTokenizer):
        return []
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return list(with_special[: len(with_special) - len(plain)]) if with_special[-len(plain) :] == plain else []


def run_task(
    kind: str,
    model: str | Path | torch.nn.Module,
    methods: Sequence[str],
    build: Callable[[object, int], list[Sample]],
    lengths: Sequence[int],
    score: ScoreFn,
    tokenizer: str | None = None,
    cache_mode: str = "rerotate",
    batch_size: int = 8,
    dtype: str = "auto",
    device: str | None = None,
    settings: dict | None = None,
    show_progress: bool = True,
    resume_file: str | Path | None = None,
    ready: Callable[[], object] | None = None,
    base_length: int | None = None,
    policy: str | None = None,
) -> TaskReport:
    """Build the samples of every length once, then generate and score them under each method.

    ``build(tokenizer, length)`` returns the samples of one length (the same for every method). With
    ``resume_file``, each finished (method, task, length, depth) cell is appended there as it completes,
    and a re-run of the same evaluation skips the cells it finds (a killed run loses one cell at most).
    "The same" is everything that can change a score (:func:`run_key`); a file from other settings is
    refused, never mixed in. ``ready`` is called once everything is validated, before the first model is
    loaded (the CLI claims ``out`` there). ``base_length`` declares the training length L every method extends
    from (default: the model's own).
    """
    from clex.cache import CACHE_MODES
    from clex.eval.common import argument_error, check_model_arg, length_list, method_list

    check_model_arg(model)
    methods = method_list(methods, base_length)  # unknown or malformed methods fail before any work
    lengths = length_list(lengths)
    check_positive("batch_size", batch_size)
    cache_mode = policy if policy is not None else cache_mode  # policy: the older name
    if cache_mode not in CACHE_MODES:
        raise argument_error("cache_mode", f"must be one of {CACHE_MODES}, got {cache_mode!r}")
    device = resolve_device(device)
    torch_dtype = dtype_of(dtype, device)
    tok, config = model_tokenizer_config(model, tokenizer)
    samples = [s for n in lengths for s in build(tok, n)]
    if not samples:
        raise D.DataError(f"{kind}: no samples to evaluate")
    vocab = config.get_text_config().vocab_size
    top = max(max(s.ids) for s in samples)
    if top >= vocab:
        raise D.DataError(f"the tokenizer gives id {top}, beyond the model's vocabulary of {vocab} (`tokenizer`?)")
    report = TaskReport(
        kind=kind, model=str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        training_length=base_length or training_length(config), methods=list(methods), lengths=lengths,
        settings={**(settings or {}), "policy": cache_mode, "dtype": str(torch_dtype).replace("torch.", ""),
                  "device": device, "tokenizer": getattr(tok, "name_or_path", None) or getattr(tok, "name", "?"),
                  "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    )
    cells: dict[tuple[str, int, float | None], list[int]] = {}
    for i, s in enumerate(samples):
        cells.setdefault((s.task, s.length, s.depth), []).append(i)
    claimed = ready() if ready is not None else None
    key = run_key(kind, model, tok, samples, cache_mode, batch_size, torch_dtype, device) if resume_file else {}
    done = Checkpoint(resume_file, key, claimed)
    bar = progress_bar(len(samples) * len(methods), show_progress, unit="sample", leave=False)
    if bar is not None:
        bar.unit = "sample"
    for spec in methods:
        todo = [c for c in cells if not done.has(spec, c)]
        model_m = model_for_method(model, spec, torch_dtype, device) if todo else None
        for (task, n, depth), members in cells.items():
            if done.has(spec, (task, n, depth)):
                row, predictions = done.get(spec, (task, n, depth))
                report.rows.append(row)
                report.predictions.extend(predictions)
                if bar is not None:
                    bar.update(len(members))
                continue
            if bar is not None:
                bar.set_description(f"{spec} {task} @ {n}")
            start = time.perf_counter()
            cell = [samples[i] for i in members]
            try:
                tick = bar.update if bar is not None else None
                answers = greedy_answers(model_m, tok, cell, cache_mode, batch_size, tick)
            except NonFiniteLogits:
                raise D.DataError(f"method {spec!r}, {task} at length {n}: the model's logits are NaN (e.g. fp16 "
                                  "overflow or broken weights); no answer is scored for it") from None
            scores = [float(score(a, s)) for a, s in zip(answers, cell, strict=True)]
            report.rows.append(TaskRow(
                method=spec, task=task, length=n, depth=depth, metric=cell[0].metric, score=float(np.mean(scores)),
                samples=len(cell), prompt_tokens=float(np.mean([len(s.ids) for s in cell])),
                seconds=time.perf_counter() - start,
            ))
            predictions = [
                {"method": spec, "task": task, "length": n, "depth": depth, "prediction": a, "answers": s.answers,
                 "score": sc, "prompt_tokens": len(s.ids)}
                for a, s, sc in zip(answers, cell, scores, strict=True)
            ]
            report.predictions.extend(predictions)
            done.add(spec, (task, n, depth), report.rows[-1], predictions)
        del model_m
    if bar is not None:
        bar.close()
    return report


def write_task_report(report: TaskReport, out) -> Path:
    """``results.json`` (each row's score also under its metric's name), ``predictions.jsonl``,
    ``results.md``, ``<kind>.png`` and, for tasks with depths, ``<kind>_heatmap.png``, in ``out`` (a path,
    or an :class:`clex.outdir.OutDir` the CLI claimed), each recorded in its manifest before written."""
    from clex.eval import report as R
    from clex.io.eval_run import as_outdir

    out = as_outdir(out, f"eval-{report.kind}")
    payload = {k: v for k, v in asdict(report).items() if k not in ("rows", "predictions")}
    payload["rows"] = [{**asdict(r), r.metric: r.score} for r in report.rows]
    payload["summary"] = {task: {m: {str(n): v for n, v in by.items()} for m, by in report.table(task).items()}
                          for task in report.tasks()}
    out.write_text("predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in report.predictions))
    out.write_text("results.md", R.task_markdown(report))
    out.write(f"{report.kind}.png", lambda path: R.plot_task(report, path))
    if report.depths():
        out.write(f"{report.kind}_heatmap.png", lambda path: R.plot_heatmap(report, path))
    out.write_text("results.json", json.dumps(payload, indent=2))  # last: a directory with it is complete
    return out.path
