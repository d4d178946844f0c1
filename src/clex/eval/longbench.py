"""LongBench-format evaluation (Bai et al., 2023): its records, prompt templates, truncation and metrics.

Records are LongBench's (``input``, ``context``, ``answers``, ``all_classes``, ``length``, ``dataset``),
read from a JSONL file, or, with ``datasets`` and a hub, from ``THUDM/LongBench:<dataset>``. Each is
rendered with the dataset's template (``longbench.json``, LongBench's own configs), truncated in the
middle to fit, optionally wrapped in the tokenizer's chat template (not for the few-shot and code
datasets, as LongBench does), generated greedily up to the dataset's token budget and scored with the
dataset's metric (``metrics.py``). A length n here is the whole window: the prompt is cut to
n − (tokens to generate), so prompt and answer fit in n.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from .. import data as D
from .metrics import LONGBENCH_METRICS, METRIC_NAMES, longbench_score
from .tasks import Sample, TaskReport, run_task, special_prefix

NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")  # LongBench feeds these raw
REQUIRED = ("input", "context", "answers")
HUB_NAME = "THUDM/LongBench"


@cache
def config() -> dict:
    return json.loads((Path(__file__).with_name("longbench.json")).read_text(encoding="utf-8"))


def load_records(data: str, dataset: str | None = None) -> list[dict]:
    """Records of a LongBench-format JSONL file, or ``THUDM/LongBench:<dataset>`` from the hub.

    A record without ``dataset`` takes ``dataset``; every record's dataset must be one LongBench
    defines (its template and metric are needed).
    """
    path = Path(data)
    if path.exists():
        records = []
        with open(path, encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise D.DataError(f"{path}:{no}: not JSON ({err.msg})") from err
                records.append(_check(rec, f"{path}:{no}", dataset))
    elif data.startswith(HUB_NAME):
        records = _hub(data, dataset)
    else:
        raise D.DataError(f"LongBench data {data!r} not found: give a .jsonl file or {HUB_NAME}:<dataset>")
    if not records:
        raise D.DataError(f"no LongBench records in {data!r}")
    return records


def _check(rec, where: str, dataset: str | None) -> dict:
    if not isinstance(rec, dict):
        raise D.DataError(f"{where}: a record must be a JSON object")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise D.DataError(f"{where}: record lacks {', '.join(missing)} (LongBench records have {', '.join(REQUIRED)})")
    name = rec.get("dataset") or dataset
    if name and name.endswith("_e"):
        name = name[:-2]  # LongBench-E uses the same templates and metrics
    if name not in LONGBENCH_METRICS:
        raise D.DataError(f"{where}: dataset {name!r} is not a LongBench dataset "
                          f"(one of {', '.join(LONGBENCH_METRICS)}; or pass --dataset)")  # fmt: skip
    answers = rec["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise D.DataError(f"{where}: answers must be a non-empty list of strings")
    return {**rec, "dataset": name, "answers": answers, "all_classes": rec.get("all_classes") or []}


def _hub(data: str, dataset: str | None) -> list[dict]:
    name, _, subset = data.partition(":")
    subset = subset or dataset
    if not subset:
        raise D.DataError(f"name the LongBench dataset: {HUB_NAME}:<dataset>, e.g. {HUB_NAME}:hotpotqa")
    if not D.hub_reachable():
        raise D.DataError(f"{data}: the hub is not reachable; give a LongBench-format .jsonl file instead")
    from datasets import load_dataset

    try:
        rows = load_dataset(name, subset, split="test")
    except Exception as err:  # datasets raises many types; say which and stop
        raise D.DataError(f"could not load {data} from the hub: {str(err).splitlines()[0][:200]}") from err
    return [_check(dict(r), f"{data}[{i}]", subset) for i, r in enumerate(rows)]


def _uses_chat(tokenizer, chat: str, dataset: str) -> bool:
    if chat not in ("auto", "on", "off"):
        raise D.DataError(f"chat must be auto, on or off, got {chat!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise D.DataError("--chat on needs a tokenizer with a chat template")
    return chat != "off" and has_template and dataset not in NO_CHAT


def prompt_ids(tokenizer, record: dict, length: int, chat: str = "auto") -> tuple[list[int], int]:
    """(prompt ids, tokens to generate) for ``record`` in a window of ``length`` tokens."""
    dataset = record["dataset"]
    new = config()["max_new_tokens"][dataset]
    budget = length - new
    if budget < 2:
        raise D.DataError(f"length {length} leaves no room for a {dataset} prompt ({new} tokens to generate)")
    text = config()["prompts"][dataset].format(context=record["context"], input=record["input"])
    ids = list(D.encode(tokenizer, text))
    if len(ids) > budget:  # LongBench keeps the beginning and the end, where the instructions are
        half = budget // 2
        ids = ids[:half] + ids[-half:]
    if _uses_chat(tokenizer, chat, dataset):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))  # fmt: skip
    else:
        ids = special_prefix(tokenizer) + ids
    return ids, new


def longbench_samples(tokenizer, length: int, records: list[dict], chat: str = "auto") -> list[Sample]:
    out = []
    for rec in records:
        ids, new = prompt_ids(tokenizer, rec, length, chat)
        metric = METRIC_NAMES[LONGBENCH_METRICS[rec["dataset"]]]
        stops = ("\n",) if rec["dataset"] == "samsum" else ()
        out.append(Sample(ids, rec["answers"], new, rec["dataset"], length, None, metric,
                          {"all_classes": rec["all_classes"], "length": rec.get("length")}, stops))  # fmt: skip
    return out


def score(answer: str, sample: Sample) -> float:
    return longbench_score(sample.task, answer, sample.answers, sample.extra.get("all_classes") or ())


def evaluate_longbench(
    model, methods, lengths, data: str, dataset: str | None = None, chat: str = "auto", limit: int | None = None,
    **run,
) -> TaskReport:  # fmt: skip
    """LongBench scores per dataset (and their average) by method × window length."""
    records = load_records(data, dataset)
    if limit is not None:
        if limit < 1:
            raise D.DataError(f"limit must be at least 1, got {limit}")
        by_dataset: dict[str, list[dict]] = {}
        for r in records:
            by_dataset.setdefault(r["dataset"], []).append(r)
        records = [r for rs in by_dataset.values() for r in rs[:limit]]
    settings = {"data": data, "chat": chat, "records": len(records), "limit": limit}
    return run_task("longbench", model, methods, lambda tok, n: longbench_samples(tok, n, records, chat), lengths,
                    score, settings=settings, **run)  # fmt: skip
