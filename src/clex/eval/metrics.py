"""Scores of generated answers, each in [0, 1]: RULER's string matches and LongBench's per-dataset metrics.

LongBench's definitions (THUDM/LongBench, ``metrics.py``) are followed exactly where the library
allows: SQuAD-style normalisation and token F1, the classification and retrieval rules, and the code
similarity of ``fuzzywuzzy.fuzz.ratio`` without python-Levenshtein (difflib's ratio, rounded to a
whole percent; here from the standard library). One deliberate difference: ROUGE-L is the F-measure of
the ``rouge-score`` package (LCS over its tokens: lower-cased ASCII words, or whitespace-separated words
for Chinese after jieba segmentation), not the unmaintained ``rouge`` package LongBench calls, so
summarisation scores can differ slightly from LongBench's published tables.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Sequence

ZH_PUNCTUATION = (  # noqa: E501
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


# --- RULER -----------------------------------------------------------------------------------------
def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Share of the references found in the prediction (case-insensitive): RULER's recall."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1 when any reference is in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


# --- LongBench -------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def normalize_zh_answer(s: str) -> str:
    punct = set(string.punctuation + ZH_PUNCTUATION)
    return "".join("".join(ch for ch in s.lower() if ch not in punct).split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _jieba_cut(text: str) -> list[str]:
    try:
        import jieba
    except ImportError as err:
        raise ImportError("the Chinese LongBench datasets need jieba: pip install jieba") from err
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh(prediction: str, reference: str, **_) -> float:
    pred = [t for t in (normalize_zh_answer(x) for x in _jieba_cut(prediction)) if t]
    ref = [t for t in (normalize_zh_answer(x) for x in _jieba_cut(reference)) if t]
    return token_f1(pred, ref)


class _Whitespace:
    """rouge-score tokenizer that keeps every whitespace-separated token (for segmented Chinese)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def rouge_l(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F-measure (rouge-score's tokens: lower-cased runs of ASCII letters and digits)."""
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure)


def rouge_l_zh(prediction: str, reference: str, **_) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Whitespace())
    return float(scorer.score(" ".join(_jieba_cut(reference)), " ".join(_jieba_cut(prediction)))["rougeL"].fmeasure)


def classification(prediction: str, reference: str, all_classes: Sequence[str] = (), **_) -> float:
    """1/k when the reference is among the k class names found in the prediction (names that are
    substrings of the reference, and not it, are not counted against it)."""
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in reference and c != reference)]
    return 1.0 / len(found) if reference in found else 0.0


PARAGRAPH = {"passage_retrieval_en": (re.compile(r"Paragraph (\d+)"), "Paragraph 3"),
             "passage_retrieval_zh": (re.compile(r"段落(\d+)"), "段落3")}


def _share_equal(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction that are the paragraph id of ``Paragraph K``."""
    return _share_equal(prediction, PARAGRAPH["passage_retrieval_en"][0].findall(reference)[0])


def retrieval_zh(prediction: str, reference: str, **_) -> float:
    return _share_equal(prediction, PARAGRAPH["passage_retrieval_zh"][0].findall(reference)[0])


def count(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction equal to the count."""
    return _share_equal(prediction, str(reference))


def code_similarity(prediction: str, reference: str, **_) -> float:
    """fuzz.ratio (difflib, whole percent) between the reference and the first generated line that is not
    a comment or a code fence."""
    line = next((x for x in prediction.lstrip("\n").split("\n") if "`" not in x and "#" not in x and "//" not in x), "")
    if not line or not reference:
        return 0.0
    return round(100 * difflib.SequenceMatcher(None, line, reference).ratio()) / 100


LONGBENCH_METRICS = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "multifieldqa_zh": qa_f1_zh,
    "hotpotqa": qa_f1, "2wikimqa": qa_f1, "musique": qa_f1, "dureader": rouge_l_zh, "gov_report": rouge_l,
    "qmsum": rouge_l, "multi_news": rouge_l, "vcsum": rouge_l_zh, "trec": classification, "triviaqa": qa_f1,
    "samsum": rouge_l, "lsht": classification, "passage_retrieval_en": retrieval, "passage_count": count,
    "passage_retrieval_zh": retrieval_zh, "lcc": code_similarity, "repobench-p": code_similarity,
}
METRIC_NAMES = {qa_f1: "qa_f1", qa_f1_zh: "qa_f1_zh", rouge_l: "rouge_l", rouge_l_zh: "rouge_l_zh",
                classification: "classification", retrieval: "retrieval", retrieval_zh: "retrieval_zh",
                count: "count", code_similarity: "code_sim"}
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")  # LongBench scores only the first line of these


def unscorable(dataset: str, reference: str) -> str | None:
    """Why ``reference`` cannot be scored under ``dataset``'s metric (None when it can), said before any
    generation: the retrieval metrics read the paragraph number out of the reference."""
    pattern, example = PARAGRAPH.get(dataset, (None, ""))
    if pattern is not None and not pattern.search(reference):
        return f"a {dataset} answer must name its paragraph, like {example!r}"
    return None


def missing_package(dataset: str) -> str | None:
    """The package ``dataset``'s metric needs that is not installed, or None."""
    import importlib.util

    metric = LONGBENCH_METRICS[dataset]
    needed = {qa_f1_zh: "jieba", rouge_l_zh: "jieba", rouge_l: "rouge_score"}.get(metric)
    return needed if needed and importlib.util.find_spec(needed) is None else None


def longbench_score(dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] = ()) -> float:
    """The best score of ``prediction`` over the reference ``answers`` under ``dataset``'s metric."""
    metric = LONGBENCH_METRICS[dataset]
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((metric(prediction, a, all_classes=all_classes or ()) for a in answers), default=0.0)
