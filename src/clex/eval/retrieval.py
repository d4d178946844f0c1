"""Passkey retrieval and needle-in-a-haystack, with prompts of an exact length in the model's tokens.

Every prompt is assembled from pieces tokenized separately (head, filler sentences, needle, question)
and fed as those ids, so a prompt of length n has exactly n tokens whatever the tokenizer, and the
needle sits at a sentence boundary: the one nearest to ``depth`` percent of the filler.

* ``passkey`` — the format of Mohtashami & Jaggi (2023), used by CLEX, YaRN and LongRoPE: a task line,
  the repeated filler "The grass is green. …", the line "The pass key is K. Remember it. K is the pass
  key." at the depth, and "What is the pass key? The pass key is"; correct when the first number the
  model writes is K.
* ``niah`` — a needle sentence (default: a magic number) inserted into real text (default
  ``sotu:test``); correct when the answer contains the expected string.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

import numpy as np

from clex import data as D
from clex.data.tokens import encode
from clex.eval.tasks import Sample, TaskReport, run_task, special_prefix

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NIAH_NEEDLE = "The special magic number is {key}."
NIAH_QUESTION = "What is the special magic number mentioned in the text? The special magic number is"


def haystack_prompt(
    head: list[int], filler: Iterable[list[int]], needle: list[int], tail: list[int], length: int, depth: float
) -> tuple[list[int], int]:
    """``head + filler[:p] + needle + filler[p:] + tail`` of exactly ``length`` ids.

    The filler is taken sentence by sentence until it fills the budget (the last one cut to fit); p is
    the sentence boundary nearest to ``depth``% of the filler. Returns (ids, index of the needle's first id).
    """
    if not 0 <= depth <= 100:
        raise D.DataError(f"depths are percentages in 0 … 100, got {depth:g}")
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise D.DataError(
            f"length {length} is shorter than the prompt without filler ({length - budget} tokens); "
            "ask for longer lengths" + (" or drop the task line (`no_intro`)" if head else "")
        )
    ids: list[int] = []
    boundaries = [0]
    for sentence in filler:
        if len(ids) >= budget:
            break
        if not sentence:
            continue
        ids.extend(sentence[: budget - len(ids)])
        boundaries.append(len(ids))
    if len(ids) < budget:
        raise D.DataError(f"not enough filler text for a prompt of {length} tokens")
    target = depth / 100 * budget
    cut = min(boundaries, key=lambda b: (abs(b - target), b))
    return head + ids[:cut] + needle + ids[cut:] + tail, len(head) + cut


def _key(rng: np.random.Generator, digits: int) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _rng(seed: int, *cell: int) -> np.random.Generator:
    """The same key and haystack for a cell whatever else is evaluated (methods, other lengths)."""
    return np.random.default_rng([seed, *cell])


def parse_depths(depths: Sequence[float] | str) -> list[float]:
    items = depths.split(",") if isinstance(depths, str) else depths
    values = [float(x) for x in items if str(x).strip()]
    if not values or any(not 0 <= d <= 100 for d in values):
        raise D.DataError(f"depths must be percentages in 0 … 100, got {depths!r}")
    return sorted(set(values))


def _check_counts(trials: int, key_digits: int) -> None:
    if trials < 1:
        raise D.DataError(f"trials must be at least 1, got {trials}")
    if not 1 <= key_digits <= 18:
        raise D.DataError(f"key digits must be in 1 … 18, got {key_digits}")


# --- passkey -------------------------------------------------------------------------------------
def passkey_samples(
    tokenizer, length: int, depths: Sequence[float] = (0, 50, 100), trials: int = 5, seed: int = 0,
    key_digits: int = 5, intro: bool = True, max_new_tokens: int = 12,
) -> list[Sample]:
    """``trials`` passkey prompts of exactly ``length`` tokens at each depth."""
    _check_counts(trials, key_digits)
    head = special_prefix(tokenizer) + (encode(tokenizer, PASSKEY_INTRO + "\n") if intro else [])
    filler = [encode(tokenizer, s + " ") for s in PASSKEY_FILLER]
    tail = encode(tokenizer, "\n" + PASSKEY_QUESTION)
    out = []
    for di, depth in enumerate(parse_depths(depths)):
        for trial in range(trials):
            key = _key(_rng(seed, length, di, trial), key_digits)
            needle = encode(tokenizer, "\n" + PASSKEY_NEEDLE.format(key=key) + "\n")
            ids, at = haystack_prompt(head, itertools.cycle(filler), needle, tail, length, depth)
            out.append(Sample(ids, [key], max_new_tokens, "passkey", length, depth, "accuracy",
                              {"key": key, "needle_index": at}))
    return out


def first_number_is(answer: str, sample: Sample) -> float:
    """Passkey's rule: the first integer the model writes is the key."""
    found = re.search(r"\d+", answer)
    return float(found is not None and found.group(0) == sample.answers[0])


# --- needle in a haystack --------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(docs: Sequence[D.Document]) -> list[str]:
    """The sentences of ``docs`` in order, whitespace collapsed."""
    out = []
    for d in docs:
        out.extend(s for s in (" ".join(p.split()) for p in _SENTENCE_END.split(d.text)) if s)
    return out


def niah_samples(
    tokenizer, length: int, haystack: Sequence[list[int]], depths: Sequence[float] = (0, 25, 50, 75, 100),
    trials: int = 3, seed: int = 0, needle: str = NIAH_NEEDLE, question: str = NIAH_QUESTION,
    answer: str | None = None, key_digits: int = 7, max_new_tokens: int = 16,
) -> list[Sample]:
    """Needle prompts of exactly ``length`` tokens: tokenized haystack sentences from a seeded start, the
    needle at each depth, then the question. ``{key}`` in the needle is a fresh random number per trial
    (the expected answer); a needle without it needs ``answer``."""
    _check_counts(trials, key_digits)
    if "{key}" not in needle and not answer:
        raise D.DataError("a needle without {key} needs the expected answer (`answer`)")
    if not haystack:
        raise D.DataError("the haystack has no sentences")
    head = special_prefix(tokenizer)
    tail = encode(tokenizer, "\n" + question)
    out = []
    for di, depth in enumerate(parse_depths(depths)):
        for trial in range(trials):
            rng = _rng(seed, length, di, trial)
            key = _key(rng, key_digits)
            expected = answer or key
            needle_ids = encode(tokenizer, needle.replace("{key}", key) + " ")
            start = int(rng.integers(len(haystack)))
            filler = itertools.islice(itertools.cycle(haystack), start, None)
            ids, at = haystack_prompt(head, filler, needle_ids, tail, length, depth)
            out.append(Sample(ids, [expected], max_new_tokens, "niah", length, depth, "accuracy",
                              {"needle_index": at}))
    return out


def contains_answer(answer: str, sample: Sample) -> float:
    """Containment, case-insensitive (RULER's string match on one reference)."""
    return float(any(a.lower() in answer.lower() for a in sample.answers))


def tokenized_sentences(tokenizer, data: str, text_field: str = "text") -> list[list[int]]:
    """Each sentence of ``data`` tokenized on its own, with the space that follows it."""
    texts = [s + " " for s in sentences(D.load_documents(data, text_field))]
    if isinstance(tokenizer, D.ByteTokenizer):
        return [tokenizer.encode(t) for t in texts]
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# --- entry points ----------------------------------------------------------------------------------
def evaluate_passkey(
    model, methods, lengths, depths=(0, 50, 100), trials: int = 5, seed: int = 0, key_digits: int = 5,
    intro: bool = True, max_new_tokens: int = 12, **run,
) -> TaskReport:
    """Passkey accuracy by method × length × depth (``run``: tokenizer, cache_mode, batch_size, dtype, device …)."""
    depths = parse_depths(depths)

    def build(tok, n):
        return passkey_samples(tok, n, depths, trials, seed, key_digits, intro, max_new_tokens)

    settings = {"depths": depths, "trials": trials, "seed": seed, "key_digits": key_digits, "intro": intro}
    return run_task("passkey", model, methods, build, lengths, first_number_is, settings=settings, **run)


def evaluate_niah(
    model, methods, lengths, depths=(0, 25, 50, 75, 100), trials: int = 3, seed: int = 0, data: str = "sotu:test",
    needle: str = NIAH_NEEDLE, question: str = NIAH_QUESTION, answer: str | None = None, max_new_tokens: int = 16,
    text_field: str = "text", **run,
) -> TaskReport:
    """Needle-in-a-haystack accuracy by method × length × depth, haystack from ``data``."""
    depths = parse_depths(depths)
    haystacks: dict[int, list[list[int]]] = {}

    def build(tok, n):
        hay = haystacks.setdefault(id(tok), tokenized_sentences(tok, data, text_field))
        return niah_samples(tok, n, hay, depths, trials, seed, needle, question, answer,
                            max_new_tokens=max_new_tokens)

    settings = {"depths": depths, "trials": trials, "seed": seed, "data": data, "needle": needle,
                "question": question}
    return run_task("niah", model, methods, build, lengths, contains_answer, settings=settings, **run)
