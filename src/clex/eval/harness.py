"""A bridge to lm-evaluation-harness (``clex eval lm-eval``; extra ``clex-llm[lmeval]``).

The model is loaded and switched to each method the way every clex evaluation does
(``model_for_method``), then handed to lm-eval as an object (``HFLM(pretrained=model)``), so any
harness task — a hub task, or a local YAML task through ``include_path`` — runs on CLEX or a baseline.
Generation tasks go through ``model.generate``, where CLEX's cache hook keeps keys right as t grows.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from clex import data as D
from clex.errors import describe
from clex.eval.common import (
    argument_error,
    check_model_arg,
    check_positive,
    dtype_of,
    method_list,
    model_for_method,
    model_tokenizer_config,
    resolve_device,
)
from clex.models import supported_length


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("clex eval lm-eval needs lm-evaluation-harness: pip install 'clex-llm[lmeval]'") from err
    return lm_eval, HFLM, TaskManager


def _masked_hflm(HFLM):
    """lm-eval's HFLM, each row of a right-padded log-likelihood batch given its attention mask. lm-eval pads the
    rows of a batch with zeros and calls the model without a mask: harmless for a causal model whose rotary does
    not look at the length, but CLEX's t follows each sequence's length, so every row would take the longest's.
    The row lengths are read where lm-eval pads (``pad_and_concat``, patched by :func:`_recording_lengths`)."""

    class MaskedHFLM(HFLM):
        _row_lengths: list[int] | None = None

        def _model_call(self, inps, attn_mask=None, labels=None):
            lengths, self._row_lengths = self._row_lengths, None
            if attn_mask is not None or labels is not None or not lengths or len(lengths) != inps.shape[0]:
                return super()._model_call(inps, attn_mask, labels)
            if min(lengths) == inps.shape[1]:  # nothing padded
                return super()._model_call(inps)
            ends = torch.tensor(lengths, device=inps.device)[:, None]
            mask = torch.arange(inps.shape[1], device=inps.device)[None] < ends
            dtype = self.mixed_precision_dtype
            with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                return self.model(inps, attention_mask=mask.long()).logits

    return MaskedHFLM


@contextlib.contextmanager
def _recording_lengths(lm):
    """While lm-eval runs: each right-padded batch's row lengths, recorded for ``lm``'s next model call."""
    import lm_eval.models.huggingface as hf

    original = hf.pad_and_concat

    def recording(max_length, tensors, padding_side="right"):
        if padding_side == "right":
            lm._row_lengths = [int(t.shape[-1]) for t in tensors]  # before padding: it replaces them in place
        return original(max_length, tensors, padding_side=padding_side)

    hf.pad_and_concat = recording
    try:
        yield
    finally:
        hf.pad_and_concat = original


def _task_list(tasks: str | Sequence[str]) -> list[str]:
    """lm-eval task names; one string may name one task or several, comma-separated (as ``tasks``)."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    elif not isinstance(tasks, Iterable) or isinstance(tasks, (bytes, dict)):
        raise TypeError(f"tasks must be a list of lm-eval task names such as ['hellaswag'], got {describe(tasks)}")
    tasks = list(tasks)
    for task in tasks:
        if not isinstance(task, str):
            raise TypeError(f"tasks must hold lm-eval task names (str), got {describe(task)}")
    if not tasks:
        raise argument_error("tasks", "is empty; give at least one lm-eval task, e.g. hellaswag")
    return tasks


def evaluate_harness(
    model: str | Path | torch.nn.Module,
    methods: Sequence[str],
    tasks: Sequence[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    tokenizer: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    log_samples: bool = False,
    ready: Callable[[], object] | None = None,
    base_length: int | None = None,
) -> dict:
    """lm-eval's ``results`` (and, with ``log_samples``, its per-sample records) for each method.

    lm-eval truncates prompts from the left to ``max_length``; by default that is the length the method
    is meant for (factor × L, CLEX's max_factor × L, or L for vanilla).
    """
    check_model_arg(model)
    methods = method_list(methods, base_length)
    tasks = _task_list(tasks)
    check_positive("batch_size", batch_size)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise TypeError(f"limit must be a number of examples per task (or a fraction below 1), got "
                            f"{describe(limit)}")
        if not limit > 0:
            raise argument_error("limit", f"must be positive, got {limit!r}")
    for name, value in (("num_fewshot", num_fewshot), ("max_length", max_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name} must be an integer, got {describe(value)}")
    if num_fewshot is not None and num_fewshot < 0:
        raise argument_error("num_fewshot", f"must be 0 or more, got {num_fewshot}")
    if max_length is not None:
        check_positive("max_length", max_length)
    if include_path is not None:
        if not isinstance(include_path, (str, Path)):
            raise TypeError(f"include_path must be a folder of lm-eval task YAMLs (str or Path), got "
                            f"{describe(include_path)}")
        include_path = str(include_path)
        if not Path(include_path).exists():
            raise argument_error("include_path", f"{include_path!r} does not exist (a folder of lm-eval task YAMLs)")
    device = resolve_device(device)
    torch_dtype = dtype_of(dtype, device)
    lm_eval, HFLM, TaskManager = _lm_eval()
    tok, config = model_tokenizer_config(model, tokenizer)
    if isinstance(tok, D.ByteTokenizer):
        raise D.DataError("lm-eval needs a transformers tokenizer; byte-level models are not supported by the bridge")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise argument_error("tasks", f"names unknown lm-eval task(s) {unknown} (a local YAML task needs the folder "
                             "holding it given as the include path)")
    if ready is not None:
        ready()
    out: dict = {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__, "tasks": list(tasks),
                 "methods": {}}
    for spec in methods:
        model_m = model_for_method(model, spec, torch_dtype, device)
        # the context lm-eval may fill: what the method is meant for, at least the config's (a scaled model)
        fill = max(model_m.config.get_text_config().max_position_embeddings, supported_length(model_m, spec))
        lm = _masked_hflm(HFLM)(pretrained=model_m, tokenizer=tok, batch_size=batch_size, device=device,
                                max_length=max_length or fill)
        with _recording_lengths(lm):
            res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=log_samples)
        entry = {"results": res["results"]}
        if log_samples:
            entry["samples"] = res["samples"]
        out["methods"][spec] = entry
        del model_m, lm
    return out


def harness_markdown(result: dict) -> str:
    """One row per method, one column per (task, metric)."""
    cols: list[tuple[str, str]] = []
    for entry in result["methods"].values():
        for task, metrics in entry["results"].items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and "_stderr" not in key and (task, key) not in cols:
                    cols.append((task, key))
    lines = [f"# lm-eval: {result['model']}", "", "| method | " + " | ".join(f"{t} {k}" for t, k in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    for spec, entry in result["methods"].items():
        cells = [entry["results"].get(t, {}).get(k) for t, k in cols]
        lines.append(f"| {spec} | " + " | ".join("–" if c is None else f"{c:.4g}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_harness(result: dict, out) -> Path:
    """``results.json`` and ``results.md`` in ``out`` (a path, or an :class:`clex.outdir.OutDir` the CLI claimed)."""
    from clex.io.eval_run import as_outdir

    out = as_outdir(out, "eval-lm-eval")
    text = json.dumps(result, indent=2, default=str)
    out.write_text("results.md", harness_markdown(result))
    out.write_text("results.json", text)  # last: a directory with it is complete
    return out.path
