"""Generation-scored evaluations: exact prompts, metrics on hand-checked pairs, and the whole pipeline
(method, prompt, generation, parsing, scoring, report) with oracle models that answer right or not at all."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tf

import tiny
from clex.cli.main import main
from clex.data.tokens import ByteTokenizer
from clex.data.types import DataError
from clex.eval import longbench as LB
from clex.eval import metrics as M
from clex.eval import retrieval as R
from clex.eval import ruler as RU
from clex.eval.tasks import Sample, greedy_answers, run_task, write_task_report

DATA = Path(__file__).parent / "data"
BYTES = ByteTokenizer()


# --- tokenizers and models -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE with a BOS token added to every text and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [" ".join(R.PASSKEY_FILLER), R.PASSKEY_INTRO, R.PASSKEY_QUESTION, R.NIAH_QUESTION] * 20
    tk.train_from_iterator(text, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    return tok


def tiny_llama(vocab: int = 256, cls=tf.LlamaForCausalLM, L: int = 64):
    return tiny.tiny_llama(cls=cls, vocab_size=vocab, max_position_embeddings=L, eos_token_id=None,
                           bos_token_id=None, pad_token_id=None)


class Oracle(tf.LlamaForCausalLM):
    """A real Llama (methods apply to it) whose ``generate`` answers from the prompt: passkey and needle
    prompts by reading the number, anything else from ``Oracle.table`` (prompt ids → answer); or, with
    ``Oracle.silent``, nothing at all."""

    table: dict[tuple[int, ...], str] = {}
    silent = False

    def generate(self, input_ids, max_new_tokens=None, **kwargs):
        rows = []
        for row in input_ids.tolist():
            text = BYTES.decode(row)
            found = re.search(r"(?:pass key is|magic number is) (\d+)", text)
            answer = "" if self.silent else (" " + found.group(1) if found else Oracle.table[tuple(row)])
            rows.append(row + BYTES.encode(answer)[:max_new_tokens])
        width, eos = max(map(len, rows)), self.generation_config.eos_token_id
        return torch.tensor([r + [eos] * (width - len(r)) for r in rows])


@pytest.fixture
def oracle():
    Oracle.silent, Oracle.table = False, {}
    model = tiny_llama(cls=Oracle)
    model.generation_config.eos_token_id = 3  # answers are padded with it; the pipeline cuts there
    yield model
    Oracle.silent, Oracle.table = False, {}


# --- exact prompts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bytes", "bpe"])
@pytest.mark.parametrize("length", [260, 333, 1000])
def test_passkey_prompt_has_the_exact_length_and_the_key_at_its_depth(kind, length, bpe):
    tok = BYTES if kind == "bytes" else bpe
    head = R.special_prefix(tok) + R.encode(tok, R.PASSKEY_INTRO + "\n")
    filler = [R.encode(tok, s + " ") for s in R.PASSKEY_FILLER]
    longest = max(map(len, filler))
    for s in R.passkey_samples(tok, length, depths=(0, 10, 50, 90, 100), trials=2, seed=3):
        assert len(s.ids) == length
        needle = R.encode(tok, "\n" + R.PASSKEY_NEEDLE.format(key=s.answers[0]) + "\n")
        at = s.extra["needle_index"]
        assert s.ids[at : at + len(needle)] == needle
        assert s.ids[: len(head)] == head
        assert s.ids[-len(R.encode(tok, "\n" + R.PASSKEY_QUESTION)) :] == R.encode(tok, "\n" + R.PASSKEY_QUESTION)
        budget = length - len(head) - len(needle) - len(R.encode(tok, "\n" + R.PASSKEY_QUESTION))
        assert abs((at - len(head)) - s.depth / 100 * budget) <= longest  # within one filler sentence
    if kind == "bpe":
        assert head[0] == bpe.bos_token_id


def test_passkey_keys_differ_by_trial_and_repeat_by_seed():
    a = R.passkey_samples(BYTES, 400, depths=(50,), trials=4, seed=0)
    b = R.passkey_samples(BYTES, 400, depths=(50,), trials=4, seed=0)
    c = R.passkey_samples(BYTES, 400, depths=(50,), trials=4, seed=1)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert len({s.answers[0] for s in a}) == 4 and all(len(s.answers[0]) == 5 for s in a)
    assert [s.answers for s in a] != [s.answers for s in c]


def test_niah_prompt_is_exact_and_holds_the_needle_in_real_text(bpe):
    for tok in (BYTES, bpe):
        hay = R.tokenized_sentences(tok, "sotu:test")
        longest = max(len(h) for h in hay[:2000])
        for s in R.niah_samples(tok, 700, hay[:2000], depths=(0, 50, 100), trials=2):
            assert len(s.ids) == 700
            text = BYTES.decode(s.ids) if tok is BYTES else tok.decode(s.ids)
            assert f"The special magic number is {s.answers[0]}." in text
            budget = 700 - len(R.special_prefix(tok)) - len(R.encode(tok, "\n" + R.NIAH_QUESTION)) - len(
                R.encode(tok, R.NIAH_NEEDLE.format(key=s.answers[0]) + " "))
            assert abs(s.extra["needle_index"] - len(R.special_prefix(tok)) - s.depth / 100 * budget) <= longest


def test_prompt_errors_are_clear():
    with pytest.raises(DataError, match="shorter than the prompt"):
        R.passkey_samples(BYTES, 120)
    assert len(R.passkey_samples(BYTES, 120, intro=False, trials=1)[0].ids) == 120
    with pytest.raises(DataError, match="percentages"):
        R.parse_depths("0,150")
    with pytest.raises(DataError, match="trials"):
        R.passkey_samples(BYTES, 400, trials=0)
    with pytest.raises(DataError, match="needs the expected answer"):
        R.niah_samples(BYTES, 400, [[1, 2]], needle="no key here")


# --- metrics ---------------------------------------------------------------------------------------------
def test_metrics_on_hand_checked_pairs():
    # normalised "cat sat" vs "cat sat down": precision 1, recall 2/3
    assert M.qa_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert M.qa_f1("dog", "cat") == 0.0
    # LCS "the cat was under the bed" = 6 of 7 predicted and 6 of 6 reference tokens: F = 12/13
    assert M.rouge_l("the cat was found under the bed", "The cat was under the bed.") == pytest.approx(12 / 13)
    classes = ["Abbreviation", "Description", "Entity", "Human"]
    assert M.classification("Human", "Human", all_classes=classes) == 1.0
    assert M.classification("Human or Entity", "Human", all_classes=classes) == 0.5
    assert M.classification("Entity", "Human", all_classes=classes) == 0.0
    assert M.retrieval("Paragraph 3, maybe 5", "Paragraph 3") == 0.5
    assert M.count("I count 4 paragraphs, so 4", "4") == 1.0 and M.count("none", "4") == 0.0
    assert M.code_similarity("# a comment\nx = foo(1)\ny = 2", "x = foo(1)") == 1.0
    assert M.code_similarity("x = 1", "x = 2") == pytest.approx(0.8)  # difflib: 2·4 matches / 10 characters
    assert M.code_similarity("", "x") == 0.0
    assert M.string_match_all("values: 12 and 34", ["12", "34", "56", "78"]) == 0.5
    assert M.string_match_part("values: 12", ["99", "12"]) == 1.0
    assert M.longbench_score("trec", "\nHuman\nEntity", ["Human"], classes) == 1.0  # first line only
    assert M.longbench_score("hotpotqa", "Paris", ["London", "paris"]) == 1.0  # best over answers


def test_rouge_l_agrees_with_the_package_definition():
    from rouge_score import rouge_scorer

    pairs = [("a b c d e", "a c e f"), ("The quick brown fox", "quick fox jumps")]
    for p, r in pairs:
        expected = rouge_scorer.RougeScorer(["rougeL"]).score(r, p)["rougeL"].fmeasure
        assert M.rouge_l(p, r) == pytest.approx(expected)
    # by hand: LCS(a b c d e, a c e f) = a c e: P 3/5, R 3/4, F = 2/3
    assert M.rouge_l("a b c d e", "a c e f") == pytest.approx(2 / 3)


# --- generation ------------------------------------------------------------------------------------------
def test_batched_greedy_answers_equal_one_by_one_generation():
    model = tiny_llama()
    samples = R.passkey_samples(BYTES, 100, depths=(0, 100), trials=2, intro=False, max_new_tokens=6)
    together = greedy_answers(model, BYTES, samples, batch_size=8)
    for s, answer in zip(samples, together, strict=True):
        ids = torch.tensor([s.ids])
        out = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        assert answer == BYTES.decode(out[0, len(s.ids) :].tolist())


def test_stop_strings_cut_the_answer():
    model = tiny_llama()
    s = Sample(BYTES.encode("hello there"), ["x"], 12, "t", 11)
    full = greedy_answers(model, BYTES, [s])[0]
    stop = full[4]
    cut = greedy_answers(model, BYTES, [Sample(s.ids, ["x"], 12, "t", 11, stop_strings=(stop,))])[0]
    expected = (full.lstrip(stop) if not stop.strip() else full).split(stop)[0]
    assert cut == expected and len(cut) < len(full)


# --- the whole pipeline with oracles ---------------------------------------------------------------------
@pytest.mark.parametrize("silent", [False, True])
def test_passkey_and_niah_oracles_score_all_or_nothing(oracle, silent, tmp_path):
    Oracle.silent = silent
    run = {"show_progress": False, "batch_size": 4}
    pk = R.evaluate_passkey(oracle, ["vanilla", "clex"], [128, 256], depths=(0, 100), trials=2, intro=False, **run)
    nh = R.evaluate_niah(oracle, ["yarn:factor=4"], [300], depths=(0, 50), trials=2, **run)
    for report in (pk, nh):
        assert {r.score for r in report.rows} == {0.0 if silent else 1.0}
        write_task_report(report, tmp_path / report.kind)
        payload = json.loads((tmp_path / report.kind / "results.json").read_text())
        assert all(row["accuracy"] == (0.0 if silent else 1.0) for row in payload["rows"])
        assert (tmp_path / report.kind / f"{report.kind}_heatmap.png").stat().st_size > 0
    assert {(r.method, r.length, r.depth) for r in pk.rows} == {
        (m, n, d) for m in ("vanilla", "clex") for n in (128, 256) for d in (0.0, 100.0)
    }


def test_ruler_oracle_scores_every_task_fully(oracle):
    res = RU.resources()
    samples = RU.ruler_samples(BYTES, 3000, samples=1, res=res)
    assert {s.task for s in samples} == set(RU.TASKS)
    for s in samples:
        assert len(s.ids) + s.max_new_tokens <= 3000
        Oracle.table[tuple(s.ids)] = " " + ", ".join(s.answers)
    report = RU.evaluate_ruler(oracle, ["vanilla"], [3000], samples=1, show_progress=False)
    assert {r.task: r.score for r in report.rows} == {t: 1.0 for t in RU.TASKS}
    Oracle.silent = True
    report = RU.evaluate_ruler(oracle, ["vanilla"], [3000], samples=1, show_progress=False)
    assert all(r.score == 0.0 for r in report.rows)


def test_ruler_prompts_fill_the_length_and_answers_are_in_them():
    res = RU.resources()
    for s in RU.ruler_samples(BYTES, 4000, samples=2, seed=5, res=res):
        text = BYTES.decode(s.ids)
        assert 3500 < len(s.ids) + s.max_new_tokens <= 4000, s.task
        if s.task not in ("cwe", "fwe"):
            assert all(a in text for a in s.answers), s.task
    with pytest.raises(DataError, match="unknown ruler tasks"):
        RU.ruler_samples(BYTES, 2000, tasks=["nope"], res=res)
    with pytest.raises(DataError, match="smallest prompt"):
        RU.ruler_samples(BYTES, 100, tasks=["kv"], res=res)


@pytest.mark.slow
def test_longbench_file_is_scored_end_to_end(oracle, tmp_path):
    records = LB.load_records(str(DATA / "longbench_tiny.jsonl"))
    assert len({r["dataset"] for r in records}) >= 6
    for s in LB.longbench_samples(BYTES, 4096, records):
        Oracle.table[tuple(s.ids)] = s.answers[0]
    report = LB.evaluate_longbench(oracle, ["vanilla"], [4096], str(DATA / "longbench_tiny.jsonl"),
                                   show_progress=False)
    assert report.rows and all(r.score == 1.0 for r in report.rows)
    # a real (random) model through the same path: every score is a number in [0, 1]
    report = LB.evaluate_longbench(tiny_llama(), ["vanilla", "clex"], [1024], str(DATA / "longbench_tiny.jsonl"),
                                   show_progress=False)
    assert all(0.0 <= r.score <= 1.0 for r in report.rows)
    out = write_task_report(report, tmp_path)
    payload = json.loads((out / "results.json").read_text())
    assert {row["metric"] for row in payload["rows"]} >= {"qa_f1", "classification", "code_sim"}
    assert all(row[row["metric"]] == row["score"] for row in payload["rows"])


def test_longbench_truncates_in_the_middle_and_uses_chat_templates(bpe):
    rec = {"input": "Who?", "context": "word " * 3000, "answers": ["x"], "dataset": "hotpotqa"}
    rec = LB._check(rec, "r", None)
    ids, new = LB.prompt_ids(bpe, rec, 600, chat="off")
    assert new == 32 and len(ids) == 1 + 600 - 32 and ids[0] == bpe.bos_token_id
    full = R.encode(bpe, LB.config()["prompts"]["hotpotqa"].format(context=rec["context"], input="Who?"))
    half = (600 - 32) // 2
    assert ids[1:] == full[:half] + full[-half:]
    chat, _ = LB.prompt_ids(bpe, rec, 600, chat="auto")
    assert bpe.decode(chat).startswith("<s>user: ") and bpe.decode(chat).endswith("assistant:")
    raw, _ = LB.prompt_ids(bpe, {**rec, "dataset": "trec", "all_classes": []}, 600, chat="auto")
    assert "assistant:" not in bpe.decode(raw)  # LongBench feeds few-shot datasets raw
    with pytest.raises(DataError, match="chat template"):
        LB.prompt_ids(BYTES, rec, 600, chat="on")


def test_longbench_bad_records_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "q", "context": "c", "answers": ["a"], "dataset": "hotpotqa"}\n'
                   '{"input": "q", "context": "c", "dataset": "hotpotqa"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: record lacks answers"):
        LB.load_records(str(bad))
    bad.write_text('{"input": "q", "context": "c", "answers": ["a"], "dataset": "nope"}\n')
    with pytest.raises(DataError, match="not a LongBench dataset"):
        LB.load_records(str(bad))
    with pytest.raises(DataError, match="not found"):
        LB.load_records(str(tmp_path / "missing.jsonl"))


def test_run_task_rejects_bad_input_before_work(oracle):
    build = lambda tok, n: R.passkey_samples(tok, n, trials=1, intro=False)  # noqa: E731
    with pytest.raises(ValueError, match="unknown method"):
        run_task("passkey", oracle, ["nope"], build, [128], R.first_number_is, show_progress=False)
    with pytest.raises(DataError, match="vocabulary"):
        run_task("passkey", tiny_llama(vocab=64), ["vanilla"], build, [128], R.first_number_is, show_progress=False)


# --- command line ----------------------------------------------------------------------------------------
def test_cli_passkey_and_errors(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    out = tmp_path / "out"
    argv = ["eval", "passkey", "--model", str(model_dir), "--tokenizer", "bytes", "--methods", "vanilla,pi:factor=2",
            "--lengths", "128", "--depths", "0,100", "--trials", "1", "--no-intro", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in payload["rows"]} == {"vanilla", "pi:factor=2"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in payload["rows"])
    bad = tmp_path / "bad"
    assert main([*argv[:-4], "--depths", "0,101", "--out", str(bad)]) == 2
    assert "percentages" in capsys.readouterr().err
    assert main(["eval", "niah", "--model", str(model_dir), "--tokenizer", "bytes", "--lengths", "40",
                 "--out", str(bad), "--no-progress"]) == 2
    assert "shorter than the prompt" in capsys.readouterr().err
    assert not bad.exists()  # a refused command leaves no directory behind


def test_a_rerun_resumes_from_finished_cells(oracle, tmp_path):
    partial = tmp_path / "partial.jsonl"
    run = {"show_progress": False, "resume_file": partial}
    first = R.evaluate_passkey(oracle, ["vanilla", "clex"], [128, 256], depths=(0, 100), trials=2, intro=False, **run)
    assert len(partial.read_text().splitlines()) == 8 and {r.score for r in first.rows} == {1.0}
    with open(partial, "a") as f:
        f.write('{"fingerprint": "cut by a kill')  # a half-written line is ignored
    Oracle.silent = True  # the cached cells are not generated again
    again = R.evaluate_passkey(oracle, ["vanilla", "clex"], [128, 256], depths=(0, 100), trials=2, intro=False, **run)
    assert again.rows == first.rows and again.predictions == first.predictions
    with pytest.raises(DataError, match="other settings"):  # other prompts: refused, nothing mixed in
        R.evaluate_passkey(oracle, ["vanilla"], [128], depths=(0, 100), trials=3, intro=False, **run)
