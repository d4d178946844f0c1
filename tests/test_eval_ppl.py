"""`clex eval ppl`: exact perplexities, identical windows across methods, chunked loss, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers as tf

import clex
from clex import data as D
from clex.cli.main import main
from clex.eval import ppl as P
from tiny import save_llama

L = 32


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["state", "union", "congress", "people", "nation", "law", "war", "peace", "trade", "the", "of"]
    for i, n in enumerate([300, 500, 90, 1200]):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words, n)))
    return str(folder)


@pytest.fixture
def model_dir(tmp_path):
    # a large init: sharp attention, so position handling shows in the loss
    return str(save_llama(tmp_path / "model", max_position_embeddings=L, initializer_range=0.3))


def run(model_dir, corpus, **kwargs):
    defaults = dict(methods=["vanilla"], lengths=[L, 2 * L], data=corpus, samples=4, tokenizer="bytes",
                    show_progress=False)
    return P.evaluate_ppl(model_dir, **{**defaults, **kwargs})


def test_vanilla_ppl_equals_plain_transformers_loss(model_dir, corpus):
    report = run(model_dir, corpus, lengths=[L, 3 * L], samples=5)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    docs = [np.frombuffer(d.text.encode(), dtype=np.uint8) for d in D.load_documents(corpus)]
    for n in (L, 3 * L):
        # the same protocol written out: windows from each long-enough document's start, 5 evenly spread
        candidates = [d[i * n : (i + 1) * n] for d in docs for i in range(len(d) // n)]
        picks = sorted({round(x) for x in np.linspace(0, len(candidates) - 1, 5)})
        nll = tokens = 0.0
        for i in picks:
            ids = torch.tensor(candidates[i], dtype=torch.long)[None]
            with torch.no_grad():
                loss = model(ids, labels=ids).loss.double().item()
            nll, tokens = nll + loss * (n - 1), tokens + n - 1
        (result,) = [r for r in report.results if r.length == n]
        assert result.tokens == tokens and result.windows == len(picks)
        assert result.ppl == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_every_method_sees_the_same_windows(model_dir, corpus, monkeypatch):
    seen: dict[str, list] = {}
    current = {}
    real_nll, real_for_method = P.window_nll, P.model_for_method

    def record_method(model, spec, *args):
        current["spec"] = spec
        return real_for_method(model, spec, *args)

    def record(model, ids, *args, **kwargs):
        seen.setdefault(current["spec"], []).append(ids.cpu().numpy().tobytes())
        return real_nll(model, ids, *args, **kwargs)

    monkeypatch.setattr(P, "model_for_method", record_method)
    monkeypatch.setattr(P, "window_nll", record)
    report = run(model_dir, corpus, methods=["vanilla", "pi:factor=2", "yarn:factor=2", "ntk:factor=2", "clex"])
    assert len(seen) == 5 and all(v == seen["vanilla"] for v in seen.values())
    ppl = report.table()
    assert ppl["vanilla"][L] == pytest.approx(ppl["clex"][L], rel=1e-6)  # untrained CLEX = vanilla inside L
    assert ppl["pi:factor=2"][L] != pytest.approx(ppl["vanilla"][L], rel=1e-6)


def test_sliding_mode_with_stride_equal_to_length_is_non_overlapping_mode(model_dir, corpus):
    plain = run(model_dir, corpus, samples=None)
    sliding = run(model_dir, corpus, samples=None, stride=2 * L, lengths=[2 * L])
    (a,) = [r for r in plain.results if r.length == 2 * L]
    (b,) = sliding.results
    assert (a.tokens, a.windows) != (0, 0) and a.tokens == b.tokens
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-9)
    # a smaller stride scores each token once, with more context
    overlapped = run(model_dir, corpus, samples=None, stride=L, lengths=[2 * L]).results[0]
    assert overlapped.tokens > b.tokens


def test_chunked_loss_equals_full_logits(model_dir):
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 256, (1, 4 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="sum")
    for chunk in (7, 64, 10_000):
        nll, count, per_token = P.window_nll(model, ids, chunk=chunk)
        assert count == 4 * L - 1 and per_token.shape == (count,)
        assert nll == pytest.approx(full.item(), rel=1e-6)


def test_learned_clex_is_used_for_clex_and_replaced_for_others(model_dir, corpus, tmp_path):
    model = clex.from_pretrained(model_dir)
    clex.apply(model, "clex", max_factor=4)
    with torch.no_grad():
        clex.clex_modules(model)[0].clex_ode.down_proj.normal_(0, 0.5)
    trained = tmp_path / "trained"
    model.save_pretrained(trained)
    table = run(str(trained), corpus, methods=["clex", "vanilla"], lengths=[2 * L]).table()
    untrained = run(model_dir, corpus, methods=["clex"], lengths=[2 * L]).table()
    assert table["clex"][2 * L] != pytest.approx(untrained["clex"][2 * L], rel=1e-4)
    plain = run(model_dir, corpus, methods=["vanilla"], lengths=[2 * L]).table()
    assert table["vanilla"][2 * L] == pytest.approx(plain["vanilla"][2 * L], rel=1e-6)


def test_cli_writes_results(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval", "ppl", "--model", model_dir, "--methods", "vanilla,yarn:factor=2,beta_fast=16,clex",
                 "--lengths", "32,64", "--data", corpus, "--samples", "2", "--tokenizer", "bytes",
                 "--out", str(out), "--no-progress", "--per-position"])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["methods"] == ["vanilla", "yarn:factor=2,beta_fast=16", "clex"]
    assert payload["training_length"] == L and len(payload["results"]) == 6
    for r in payload["results"]:
        assert math.isfinite(r["ppl"]) and r["tokens"] > 0 and r["seconds"] >= 0 and r["peak_memory_bytes"] > 0
    assert all(r["per_position"] for r in payload["results"] if r["length"] == 64)
    assert "| vanilla |" in (out / "results.md").read_text()
    assert (out / "ppl.png").stat().st_size > 1000 and (out / "loss_by_position.png").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--lengths", "100000"], "longest has"),
        (["--methods", "vanilla,warp"], "unknown method"),
        (["--methods", "pi:8"], "key=value"),
        (["--methods", "factor=2"], "starts with a parameter"),
        (["--model", "./no/such/model"], "does not exist"),
        (["--data", "someorg/no-such-dataset"], "hub"),
        (["--lengths", "4m"], "length"),
    ],
)
def test_cli_bad_input_one_clear_line(model_dir, corpus, tmp_path, capsys, args, match):
    base = {"--model": model_dir, "--methods": "vanilla", "--lengths": "32", "--data": corpus}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["eval", "ppl", "--tokenizer", "bytes", "--no-progress", "--out", str(tmp_path / "o")]
    argv += [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_empty_corpus_via_cli(model_dir, tmp_path, capsys):
    (tmp_path / "blank.txt").write_text(" \n")
    argv = ["eval", "ppl", "--model", model_dir, "--lengths", "32", "--data", str(tmp_path / "blank.txt"),
            "--tokenizer", "bytes", "--no-progress", "--out", str(tmp_path / "o")]
    assert main(argv) == 2 and "no non-empty documents" in capsys.readouterr().err
