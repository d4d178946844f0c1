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

from functools import cache
from pathlib import Path

from clex import data as D
from clex.data.chat import apply_template
from clex.eval.metrics import LONGBENCH_METRICS, METRIC_NAMES, longbench_score, missing_package, unscorable
from clex.eval.tasks import Sample, TaskReport, run_task, special_prefix
from clex.jsonfile import read_json

NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")  # LongBench feeds these raw
REQUIRED = ("input", "context", "answers")
HUB_NAME = "THUDM/LongBench"


@cache
def config() -> dict:
    return read_json(Path(__file__).with_name("longbench.json"))


def load_records(data: str, dataset: str | None = None) -> list[dict]:
    """Records of a LongBench-format JSONL file, or ``THUDM/LongBench:<dataset>`` from the hub.

    A record without ``dataset`` takes ``dataset``; every record's dataset must be one LongBench
    defines (its template and metric are needed).
    """
    path = Path(data)
    if path.is_dir():
        raise D.DataError(f"LongBench data {data!r} is a folder; give a .jsonl file or {HUB_NAME}:<dataset>")
    if path.exists():
        records = [_check(D.json_line(line, path, no), f"{path}:{no}", dataset) for no, line in D.jsonl_lines(path)]
    elif data.startswith(HUB_NAME):
        records = _hub(data, dataset)
    else:
        raise D.DataError(f"LongBench data {data!r} not found: give a .jsonl file or {HUB_NAME}:<dataset>")
    if not records:
        raise D.DataError(f"no LongBench records in {data!r}")
    for name in sorted({r["dataset"] for r in records}):
        if (package := missing_package(name)) is not None:
            raise D.DataError(f"scoring {name} needs the package {package}: pip install {package.replace('_', '-')}")
    return records


def _check(rec, where: str, dataset: str | None) -> dict:
    """A record whose every field clex uses has its LongBench type (checked before any is used): ``input`` and
    ``context`` strings, ``answers`` a string or a non-empty list of strings, ``all_classes`` null or a list
    of strings, ``dataset`` null or a LongBench dataset's name, ``length`` null or a number."""
    if not isinstance(rec, dict):
        raise D.DataError(f"{where}: a record must be a JSON object, got {D.json_kind(rec)}")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise D.DataError(f"{where}: record lacks {', '.join(missing)} (LongBench records have {', '.join(REQUIRED)})")
    for key in ("input", "context"):
        if not isinstance(rec[key], str):
            raise D.field_error(where, key, "a string", rec[key])
    answers = rec["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers:
        raise D.field_error(where, "answers", "a string or a non-empty list of strings", rec["answers"])
    if not D.is_string_list(answers):
        bad = next(a for a in answers if not isinstance(a, str))
        raise D.DataError(f"{where}: field 'answers' must be a list of strings, got a list holding {D.json_kind(bad)}")
    classes = rec.get("all_classes")
    if classes is not None and not D.is_string_list(classes):
        raise D.field_error(where, "all_classes", "null or a list of strings", classes)
    length = rec.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int | float)):
        raise D.field_error(where, "length", "null or a number", length)
    name = rec.get("dataset")
    if name is not None and not isinstance(name, str):
        raise D.field_error(where, "dataset", "a string (a LongBench dataset's name)", name)
    name = name or dataset
    if name and name.endswith("_e"):
        name = name[:-2]  # LongBench-E uses the same templates and metrics
    if name not in LONGBENCH_METRICS:
        raise D.DataError(f"{where}: dataset {name!r} is not a LongBench dataset "
                          f"(one of {', '.join(LONGBENCH_METRICS)}; or pass `dataset`)")
    for answer in answers:
        if (why := unscorable(name, answer)) is not None:
            raise D.DataError(f"{where}: field 'answers': {why}, got {answer[:60]!r}")
    return {**rec, "dataset": name, "answers": answers, "all_classes": classes or []}


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
        raise D.DataError("`chat` on needs a tokenizer with a chat template")
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
        ids = list(apply_template(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False))
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
                          {"all_classes": rec["all_classes"], "length": rec.get("length")}, stops))
    return out


def score(answer: str, sample: Sample) -> float:
    return longbench_score(sample.task, answer, sample.answers, sample.extra.get("all_classes") or ())


def evaluate_longbench(
    model, methods, lengths, data: str, dataset: str | None = None, chat: str = "auto", limit: int | None = None,
    **run,
) -> TaskReport:
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
                    score, settings=settings, **run)
