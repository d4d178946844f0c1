"""The lm-evaluation-harness bridge: lm-eval's log-likelihoods on a clex model equal the model's own,
under each method, on a local YAML task (no hub)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

pytest.importorskip("lm_eval")

from clex.cli.main import main  # noqa: E402
from clex.data.types import DataError  # noqa: E402
from clex.eval.common import model_for_method  # noqa: E402
from clex.eval.harness import evaluate_harness  # noqa: E402
from tiny import save_llama  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs lm-eval over a model under each method

QUESTIONS = [
    {"question": "The grass is", "choices": ["green", "blue", "loud"], "label": 0},
    {"question": "The sky is blue. The sun is yellow. The grass is green. The sky is", "choices": ["blue", "red"],
     "label": 0},
    {"question": "Here we go. There and back", "choices": ["again", "green"], "label": 0},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("harness")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([q["question"] + " " + " ".join(q["choices"]) for q in QUESTIONS] * 5,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>")
    model_dir = save_llama(root / "model", vocab_size=tk.get_vocab_size(), max_position_embeddings=8,
                           bos_token_id=None, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(model_dir)
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "clex_tiny_mc.yaml").write_text(
        "task: clex_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return model_dir, tok, tasks


def own_loglikelihood(model, tok, context: str, continuation: str) -> float:
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return float(sum(logp[p - 1, whole[p]] for p in range(n_ctx, len(whole))))


def test_lm_eval_loglikelihoods_equal_the_models_own_under_each_method(setup, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir, tok, tasks = setup
    methods = ["vanilla", "pi:factor=4", "clex"]
    result = evaluate_harness(str(model_dir), methods, ["clex_tiny_mc"], include_path=str(tasks), device="cpu",
                              log_samples=True, max_length=64)
    per_method = {}
    for spec in methods:
        model = model_for_method(str(model_dir), spec, torch.float32, "cpu")
        samples = result["methods"][spec]["samples"]["clex_tiny_mc"]
        assert len(samples) == len(QUESTIONS)
        got = []
        for s in samples:
            q = s["doc"]
            lls = [float(r[0][0]) for r in s["resps"]]
            own = [own_loglikelihood(model, tok, q["question"], " " + c) for c in q["choices"]]
            assert lls == pytest.approx(own, abs=1e-4)
            got.append(lls)
        acc = result["methods"][spec]["results"]["clex_tiny_mc"]["acc,none"]
        picks = [max(range(len(ll)), key=ll.__getitem__) for ll in got]
        expected = sum(p == s["doc"]["label"] for p, s in zip(picks, samples, strict=True))
        assert acc == pytest.approx(expected / len(QUESTIONS))
        per_method[spec] = got
    assert per_method["vanilla"] != per_method["pi:factor=4"]  # the method really is applied


def test_lm_eval_bridge_errors(setup, tmp_path, capsys):
    model_dir, _, tasks = setup
    with pytest.raises(DataError, match="unknown lm-eval task"):
        evaluate_harness(str(model_dir), ["vanilla"], ["no_such_task_xyz"], include_path=str(tasks), device="cpu")
    with pytest.raises(DataError, match="does not exist"):
        evaluate_harness(str(model_dir), ["vanilla"], ["clex_tiny_mc"], include_path=str(tmp_path / "nope"))
    assert main(["eval", "lm-eval", "--model", str(model_dir), "--tasks", "clex_tiny_mc", "--include-path",
                 str(tasks), "--methods", "vanilla", "--device", "cpu", "--out", str(tmp_path / "o")]) == 0
    assert "clex_tiny_mc acc" in capsys.readouterr().out
    assert (tmp_path / "o" / "results.json").exists()


def test_lm_eval_batches_score_each_row_at_its_own_length(setup, monkeypatch, tmp_path):
    """lm-eval right-pads a batch with zeros and calls the model without a mask; CLEX's t follows each row's own
    length, so the bridge gives every row its mask: batched log-likelihoods equal each row scored alone."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir, tok, tasks = setup
    torch.manual_seed(0)  # larger weights than the fixture's, so that a row at another t scores visibly otherwise
    config = tf.AutoConfig.from_pretrained(model_dir)
    config.initializer_range = 0.5
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    result = evaluate_harness(str(tmp_path / "model"), ["clex"], ["clex_tiny_mc"], include_path=str(tasks),
                              device="cpu", log_samples=True, max_length=64, batch_size=3)
    model = model_for_method(str(tmp_path / "model"), "clex", torch.float32, "cpu")
    rows = []
    for s in result["methods"]["clex"]["samples"]["clex_tiny_mc"]:
        q = s["doc"]
        for r, c in zip(s["resps"], q["choices"], strict=True):
            assert float(r[0][0]) == pytest.approx(own_loglikelihood(model, tok, q["question"], " " + c), abs=1e-4)
            rows.append(tok(q["question"] + " " + c, add_special_tokens=False)["input_ids"])
    # the control: the shortest row padded to the longest without a mask (what lm-eval hands the model) is at
    # another t, and scores otherwise
    short, long = min(rows, key=len), max(len(r) for r in rows)
    assert -(-len(short) // 8) != -(-long // 8)  # L = 8: the rows batched together sit at different t
    with torch.no_grad():
        alone = model(torch.tensor([short])).logits[0]
        padded = model(torch.tensor([short + [0] * (long - len(short))])).logits[0, : len(short)]
    assert (alone - padded).abs().max() > 1e-2
