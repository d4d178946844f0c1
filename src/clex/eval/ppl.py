"""Perplexity against evaluation length, many methods side by side (``clex eval ppl``).

Protocol (the paper's and YaRN's): for each length, ``samples`` non-overlapping windows of exactly
that many tokens, the same windows for every method, the loss over every predicted token of each
window. Optional sliding-window mode (``stride``): windows of ``length`` tokens moved by ``stride``
over each document, each token scored once, with as much left context as the window gives.

The loss is computed from the last hidden states in chunks through the LM head, so the full
``[n × vocab]`` fp32 logits never exist at once.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from clex import data as D
from clex.errors import BadInput, describe
from clex.eval.common import (
    argument_error,
    check_model_arg,
    check_positive,
    dtype_of,
    length_list,
    method_list,
    model_for_method,
    model_tokenizer_config,
    resolve_device,
)
from clex.io.progress import progress_bar
from clex.models import training_length

LOGIT_CHUNK = 1024  # positions per LM-head chunk


@dataclass
class PPLResult:
    method: str
    length: int
    ppl: float
    nll_sum: float
    tokens: int
    windows: int
    seconds: float
    peak_memory_bytes: int
    per_position: list[float] | None = None  # mean NLL per position bin (longest length only)


@dataclass
class PPLReport:
    model: str
    data: str
    training_length: int
    lengths: list[int]
    methods: list[str]
    settings: dict
    results: list[PPLResult] = field(default_factory=list)

    def table(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for r in self.results:
            out.setdefault(r.method, {})[r.length] = r.ppl
        return out


# --- the loss -------------------------------------------------------------------------------------
def _head(model):
    """(decoder, lm_head, final logit softcap) of a causal LM."""
    text_config = model.config.get_text_config()
    return model.base_model, model.get_output_embeddings(), getattr(text_config, "final_logit_softcapping", None)


@torch.no_grad()
def window_nll(
    model, ids: torch.Tensor, score_from: int = 1, chunk: int = LOGIT_CHUNK
) -> tuple[float, int, torch.Tensor]:
    """Sum of next-token NLL over targets ``score_from … n−1`` of one window ``ids`` ([1, n]).

    Returns (nll sum, token count, per-target NLL [n − score_from] in fp32).
    """
    decoder, head, softcap = _head(model)
    n = ids.shape[1]
    mask = torch.ones_like(ids)
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[0]
    targets = ids[0]
    losses = []
    start = max(1, score_from)
    for a in range(start, n, chunk):  # hidden at position p−1 predicts token p
        b = min(n, a + chunk)
        logits = head(hidden[a - 1 : b - 1]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        losses.append(F.cross_entropy(logits, targets[a:b], reduction="none"))
    per_token = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)
    return float(per_token.double().sum()), per_token.numel(), per_token


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # process peak resident set (kilobytes on Linux): monotone over the run
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def evaluate_windows(
    model,
    windows: Sequence[np.ndarray],
    stride: int | None = None,
    length: int | None = None,
    per_position_bins: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, int, np.ndarray | None]:
    """NLL sum and token count over ``windows`` (non-overlapping) or, with ``stride``, over each
    sequence in ``windows`` read with a sliding window of ``length`` tokens."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    per_pos = None
    for seq in windows:
        seq_t = torch.as_tensor(np.asarray(seq, dtype=np.int64), device=device)[None]
        if stride is None:
            s, c, per_token = window_nll(model, seq_t)
            nll, count = nll + s, count + c
            if per_position_bins:
                binned = _bin(per_token.cpu().numpy(), per_position_bins)
                per_pos = binned if per_pos is None else per_pos + binned
        else:
            scored_to = 0
            for begin in range(0, seq_t.shape[1] - length + 1, stride):
                end = begin + length
                s, c, _ = window_nll(model, seq_t[:, begin:end], score_from=max(1, scored_to - begin))
                nll, count, scored_to = nll + s, count + c, end
        if progress:
            progress(1)
    if per_pos is not None:
        per_pos = per_pos / len(windows)
    return nll, count, per_pos


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    edges = np.linspace(0, len(values), bins + 1).astype(int)
    return np.array([values[a:b].mean() if b > a else np.nan for a, b in zip(edges[:-1], edges[1:], strict=True)])


# --- the evaluation -------------------------------------------------------------------------------
def evaluate_ppl(
    model: str | Path | torch.nn.Module,
    methods: Sequence[str],
    lengths: Sequence[int | str],
    data: str = "sotu:test",
    samples: int | None = 8,
    tokenizer: str | None = None,
    mode: str = "filter",
    stride: int | None = None,
    dtype: str = "auto",
    device: str | None = None,
    text_field: str = "text",
    per_position: bool = False,
    show_progress: bool = True,
    ready: Callable[[], object] | None = None,
    base_length: int | None = None,
) -> PPLReport:
    """Perplexity of ``model`` under each method at each length on the same token windows.

    ``ready`` is called once everything is validated and the windows are cut, before the first model is
    loaded (the CLI claims ``out`` there). A failure at some (method, length) raises with the finished
    results attached as ``err.partial_report``; a non-finite loss is such a failure (never a NaN result).
    ``base_length`` declares the training length L every method extends from (default: the model's own).
    """
    check_model_arg(model)
    methods = method_list(methods, base_length)  # unknown or malformed methods fail before any work
    lengths = length_list(lengths)
    check_positive("samples", samples, allow_none=True)
    if stride is not None:
        check_positive("stride", stride)
        if stride > lengths[0]:
            raise argument_error("stride", f"{stride} is larger than the window (length {lengths[0]}): the "
                                 "tokens between windows would never be scored; use a stride of at most "
                                 f"{lengths[0]}")
    data = str(data) if isinstance(data, Path) else data
    tokenizer = str(tokenizer) if isinstance(tokenizer, Path) else tokenizer
    if not isinstance(data, str):
        raise TypeError(f"data must be a data source such as 'sotu:test' or a file path (str), got {describe(data)}")
    if not isinstance(text_field, str):
        raise TypeError(f"text_field must be a str, got {describe(text_field)}")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise TypeError(f"tokenizer must be a tokenizer directory, hub name or 'bytes' (a str), got "
                        f"{describe(tokenizer)}")
    if mode not in D.CONCAT_MODES:
        raise argument_error("mode", f"must be one of {D.CONCAT_MODES}, got {mode!r}")
    device = resolve_device(device)
    torch_dtype = dtype_of(dtype, device)
    tok, config = model_tokenizer_config(model, tokenizer)
    docs = D.tokenize_documents(D.load_documents(data, text_field), tok)
    separator = getattr(tok, "eos_token_id", None)
    windows = {}
    for n in lengths:
        if stride is None:
            windows[n] = D.make_windows(docs, n, samples, mode, separator)
        else:  # whole sequences, read with a sliding window
            D.make_windows(docs, n, 1, mode, separator)  # the clear error when n exceeds every document
            seqs = _sequences(docs, n, mode, separator)
            windows[n] = seqs[:samples] if samples else seqs

    report = PPLReport(
        model=str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        data=data, training_length=base_length or training_length(config), lengths=lengths, methods=list(methods),
        settings={"samples": samples, "mode": mode, "stride": stride, "dtype": str(torch_dtype).replace("torch.", ""),
                  "device": device, "tokenizer": getattr(tok, "name_or_path", None) or getattr(tok, "name", "?"),
                  "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    )
    if ready is not None:
        ready()
    bar = progress_bar(sum(len(w) for w in windows.values()) * len(methods), show_progress, unit="window",
                       leave=False)
    try:
        _run_all(report, model, methods, lengths, windows, stride, per_position, torch_dtype, device, bar)
    finally:
        if bar is not None:
            bar.close()
    return report


class PPLEvalError(BadInput):
    """One (method, length) of a perplexity evaluation failed; ``partial_report`` holds what finished."""


def _run_all(report, model, methods, lengths, windows, stride, per_position, torch_dtype, device, bar) -> None:
    """Every (method, length) into ``report.results``; a failure is raised with the finished ones attached."""
    spec, n = methods[0], None
    try:
        for spec in methods:
            n = None
            model_m = model_for_method(model, spec, torch_dtype, device)
            for n in lengths:
                _one_length(report, model_m, spec, n, lengths, windows, stride, per_position, device, bar)
            del model_m
    except (PPLEvalError, KeyboardInterrupt) as err:
        err.partial_report = report
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        where = f"at length {n}" if n is not None else "while loading the model"
        new = PPLEvalError(f"method {spec!r} failed {where} ({type(err).__name__}: {first})")
        new.partial_report = report
        raise new from err


def _one_length(report, model_m, spec, n, lengths, windows, stride, per_position, device, bar) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if bar is not None:
        bar.set_description(f"{spec} @ {n}")
    start = time.perf_counter()
    bins = 64 if per_position and n == lengths[-1] and stride is None else 0
    tick = bar.update if bar is not None else None
    nll, count, per_pos = evaluate_windows(model_m, windows[n], stride, n, bins, tick)
    if not math.isfinite(nll) or count == 0:
        raise PPLEvalError(f"method {spec!r} at length {n}: the loss is not finite ({nll}; the model's logits hold NaN "
                           "or inf, e.g. fp16 overflow or broken weights); nothing is reported for it")
    report.results.append(PPLResult(
        method=spec, length=n, ppl=math.exp(nll / count), nll_sum=nll, tokens=count, windows=len(windows[n]),
        seconds=time.perf_counter() - start, peak_memory_bytes=_peak_memory(torch.device(device)),
        per_position=None if per_pos is None else [float(x) for x in per_pos],
    ))


def _sequences(docs: list[np.ndarray], n: int, mode: str, separator: int | None) -> list[np.ndarray]:
    """What sliding-window mode reads: each document of at least n tokens, or the joined stream."""
    if mode == "concat":
        return [D.join_documents(docs, separator)]
    return [d for d in docs if len(d) >= n]


# --- output ---------------------------------------------------------------------------------------
def write_report(report: PPLReport, out, error: str | None = None, interrupted: bool = False) -> Path:
    """``results.json``, ``results.md`` and ``ppl.png`` (and ``loss_by_position.png``) in ``out`` (a path, or
    an :class:`clex.outdir.OutDir` the CLI claimed). With ``error``, the report is what finished before it:
    ``results.json`` says ``"complete": false`` and the error; ``interrupted`` marks a run stopped by the user,
    which the same command run again replaces (a failed run's results are kept unless ``overwrite``)."""
    from clex.eval import report as R
    from clex.io.eval_run import as_outdir

    out = as_outdir(out, "eval-ppl")
    results = [asdict(r) for r in report.results]
    for r in results:  # an empty position bin (fewer targets than bins) is null, never NaN
        if r["per_position"]:
            r["per_position"] = [x if math.isfinite(x) else None for x in r["per_position"]]
    payload = {**{k: v for k, v in asdict(report).items() if k != "results"}, "results": results}
    if error is not None:
        payload = {"complete": False, "error": error, **({"interrupted": True} if interrupted else {}), **payload}
    text = json.dumps(payload, indent=2, allow_nan=False)
    out.write_text("results.md", R.ppl_markdown(report))
    if report.results:
        out.write("ppl.png", lambda path: R.plot_ppl(report, path))
    if any(r.per_position for r in report.results):
        out.write("loss_by_position.png", lambda path: R.plot_per_position(report, path))
    out.write_text("results.json", text)  # last: a directory with it is complete
    return out.path
