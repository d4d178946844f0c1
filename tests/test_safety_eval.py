"""Safety and errors of the evaluation, data, method, generation and chat paths.

Every refusal is one line on stderr, no traceback, a non-zero status, and leaves every file that existed
before byte-identical (and, for refusals, no new file outside the token cache).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import clex
from clex.cli.main import main
from clex.eval import tasks as T
from tiny import tiny_llama

L = 32  # the tiny model's training length
MANIFEST = ".clex-manifest.json"
GREEDY = T.greedy_answers


# --- fixtures and helpers --------------------------------------------------------------------------------
def save_tiny(path: Path, seed: int = 0, nan: bool = False, L: int = L) -> Path:
    model = tiny_llama(seed, max_position_embeddings=L, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if nan:
        with torch.no_grad():
            model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety-eval")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["state", "union", "congress", "people", "nation", "law", "war", "peace", "the", "of"]
    for i, n in enumerate([300, 500, 1200]):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, n)))
    return {"model": save_tiny(root / "model"), "nan": save_tiny(root / "nan-model", nan=True), "corpus": corpus,
            "root": root}


def snapshot(*roots: Path) -> dict[str, bytes]:
    files = {}
    for root in roots:
        if root.is_file():
            files[str(root)] = root.read_bytes()
        elif root.exists():
            files.update({str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
    return files


def cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def ppl_argv(shared, out, *extra) -> list:
    return ["eval", "ppl", "--model", shared["model"], "--methods", "vanilla", "--lengths", "32,64", "--data",
            shared["corpus"], "--samples", "2", "--tokenizer", "bytes", "--no-progress", "--out", out,
            *extra]


def passkey_argv(model, out, *extra) -> list:
    return ["eval", "passkey", "--model", model, "--tokenizer", "bytes", "--methods", "vanilla,pi:factor=2",
            "--lengths", "128", "--depths", "0,100", "--trials", "1", "--no-intro", "--no-progress", "--out", out,
            *extra]


def fake_results(path: Path, kind: str, extra: dict | None = None) -> Path:
    """A directory holding clex results of ``kind`` (as a finished run leaves it)."""
    path.mkdir(parents=True)
    (path / "results.json").write_text('{"old": "results"}')
    (path / "results.md").write_text("old table")
    write_manifest(path, kind, ["results.json", "results.md"])
    for name, text in (extra or {}).items():
        (path / name).write_text(text)
    return path


def write_manifest(path: Path, kind: str, names: list[str], log: tuple[str, ...] = ()) -> None:
    """The manifest clex would have written for ``names`` as they are now."""
    from clex.io.records import record_of

    entries = {name: record_of(path / name, log=name in log) for name in names}
    (path / MANIFEST).write_text(json.dumps({"clex_manifest": 2, "kind": kind, "entries": entries}))


# --- the table: refusals ------------------------------------------------------------------------------------
def _jsonl(tmp: Path, text: str) -> Path:
    path = tmp / "data.jsonl"
    path.write_text(text)
    return path


def _prompt(tmp: Path) -> Path:
    path = tmp / "prompt.txt"
    path.write_text("The grass is green.")
    return path


EVAL_KINDS = {  # subcommand → minimal arguments besides --model/--out
    "ppl": ["--lengths", "32", "--tokenizer", "bytes"],
    "passkey": ["--lengths", "128", "--tokenizer", "bytes"],
    "niah": ["--lengths", "128", "--tokenizer", "bytes"],
    "ruler": ["--lengths", "128", "--tokenizer", "bytes"],
    "longbench": ["--lengths", "128", "--tokenizer", "bytes", "--data", "records.jsonl"],
    "lm-eval": ["--tasks", "hellaswag"],
}

CASES = [
    # (id, argv builder (shared, tmp) -> argv, expected fragment of the one line)
    *[(f"{kind}-out-holding-results", lambda s, t, k=kind: [
        "eval", k, "--model", s["model"], "--out", fake_results(t / "out", f"eval-{k}"), *EVAL_KINDS[k]],
       "already holds results") for kind in EVAL_KINDS],
    ("out-with-foreign-files", lambda s, t: ppl_argv(s, _mk(t / "out", {"thesis.tex": "mine"})),
     "holds files clex did not write (thesis.tex)"),
    ("out-of-another-kind", lambda s, t: passkey_argv(s["model"], fake_results(t / "out", "eval-ppl")),
     "holds clex eval-ppl output, not eval-passkey"),
    ("out-in-use-by-a-live-job", lambda s, t: passkey_argv(s["model"], _locked(t / "out")),
     "in use by another clex job"),
    ("out-is-the-model", lambda s, t: ppl_argv(s, s["model"]), "is the model directory"),
    ("out-inside-the-model", lambda s, t: ppl_argv(s, s["model"] / "results"), "is the model directory"),
    ("device-cuda-without-cuda", lambda s, t: ppl_argv(s, t / "out", "--device", "cuda"), "CUDA is not available"),
    ("device-tpu", lambda s, t: ppl_argv(s, t / "out", "--device", "tpu"), "--device 'tpu' is not supported"),
    ("task-device-tpu", lambda s, t: passkey_argv(s["model"], t / "out", "--device", "tpu"), "not supported"),
    ("jsonl-malformed-line", lambda s, t: ppl_argv(s, t / "out", "--data", _jsonl(t, '{"text": "a"}\n{"text": \n')),
     "data.jsonl:2: not valid JSON"),
    ("jsonl-bare-string", lambda s, t: ppl_argv(s, t / "out", "--data", _jsonl(t, '"just a string"\n')),
     "data.jsonl:1: a record must be a JSON object with a 'text' field, got a string"),
    ("jsonl-text-null", lambda s, t: ppl_argv(s, t / "out", "--data", _jsonl(t, '{"text": "ok"}\n{"text": null}\n')),
     "data.jsonl:2: field 'text' must be a string, got null"),
    ("jsonl-text-number", lambda s, t: ppl_argv(s, t / "out", "--data", _jsonl(t, '{"text": 12}\n')),
     "data.jsonl:1: field 'text' must be a string, got a number"),
    ("jsonl-text-list", lambda s, t: ppl_argv(s, t / "out", "--data", _jsonl(t, '{"text": ["a", "b"]}\n')),
     "data.jsonl:1: field 'text' must be a string, got a list"),
    ("method-parameter-twice", lambda s, t: ppl_argv(s, t / "out", "--methods", "yarn:factor=2,factor=4"),
     "method parameter 'factor' is given twice in 'yarn:factor=2,factor=4'"),
    ("absurd-factor", lambda s, t: ppl_argv(s, t / "out", "--methods", "yarn:factor=1e9"),
     "factor for method 'yarn' must be a number in 1 … 1024"),
    ("absurd-max-factor", lambda s, t: ppl_argv(s, t / "out", "--methods", "clex:max_factor=1000000000"),
     "method 'clex:max_factor=1000000000': max_factor must be an integer in 1 … 1024"),
    ("bad-clex-setting", lambda s, t: ppl_argv(s, t / "out", "--methods", "clex:policy=floor"),
     "method 'clex:policy=floor': t_rule must be one of"),
    ("stride-larger-than-window", lambda s, t: ppl_argv(s, t / "out", "--stride", "33"),
     "--stride 33 is larger than the window (length 32)"),
    ("stride-zero", lambda s, t: ppl_argv(s, t / "out", "--stride", "0"), "--stride must be an integer >= 1"),
    ("samples-zero", lambda s, t: ppl_argv(s, t / "out", "--samples", "0"), "--samples must be an integer >= 1"),
    ("trials-zero", lambda s, t: passkey_argv(s["model"], t / "out", "--trials", "0"),
     "--trials must be an integer >= 1"),
    ("batch-size-zero", lambda s, t: passkey_argv(s["model"], t / "out", "--batch-size", "0"),
     "--batch-size must be an integer >= 1"),
    ("ruler-samples-zero", lambda s, t: ["eval", "ruler", "--model", s["model"], "--out", t / "out", "--samples", "0",
                                         *EVAL_KINDS["ruler"]], "--samples must be an integer >= 1"),
    ("nan-logits-ppl", lambda s, t: [*ppl_argv(s, t / "out")[:3], s["nan"], *ppl_argv(s, t / "out")[4:]],
     "method 'vanilla' at length 32: the loss is not finite"),
    ("nan-logits-passkey", lambda s, t: passkey_argv(s["nan"], t / "out"),
     "method 'vanilla', passkey at length 128: the model's logits are NaN"),
    ("clamp-false-refusal-says-refused",
     lambda s, t: ppl_argv(s, t / "out", "--methods", "clex:max_factor=1,clamp=false", "--lengths", "64"),
     "refused: sequence length 64 exceeds CLEX's max_factor·L = 1·32 and clamp=False"),
    *[(f"generate-{flag.strip('-')}-{value}", lambda s, t, f=flag, v=value: [
        "generate", "--model", s["model"], "--prompt-file", _prompt(t), "--tokenizer", "bytes", f, v], message)
      for flag, value, message in [
          ("--temperature", "-1", "--temperature must be 0 (greedy) or a finite positive number, got -1.0"),
          ("--temperature", "nan", "--temperature must be 0 (greedy) or a finite positive number, got nan"),
          ("--temperature", "inf", "--temperature must be 0 (greedy) or a finite positive number, got inf"),
          ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
          ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
      ]],
    ("chat-temperature-nan", lambda s, t: ["chat", "--model", s["model"], "--tokenizer", "bytes", "--temperature",
                                           "nan"], "--temperature must be 0 (greedy)"),
]


def _locked(path: Path) -> Path:
    """A results directory of a task evaluation that a live process (this one) is writing."""
    import os
    import socket

    path.mkdir(parents=True)
    (path / "partial.jsonl").write_text("")
    write_manifest(path, "eval-passkey", ["partial.jsonl"], log=("partial.jsonl",))
    (path / ".clex-lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": 0}))
    return path


def _mk(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize("build,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_one_line_and_nothing_touched(shared, tmp_path, capsys, build, fragment):
    if "cuda" in fragment.lower() and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = build(shared, tmp_path)
    before = snapshot(tmp_path, shared["root"])
    code, _, err = cli(capsys, argv)
    assert code == 2
    assert fragment in one_line(err)
    after = snapshot(tmp_path, shared["root"])
    assert {k: after.get(k) for k in before} == before  # every file that was there is byte-identical
    cache = str(tmp_path / "cache")
    assert [k for k in after if k not in before and not k.startswith(cache)] == []  # and nothing new was written


# --- --out: what --overwrite removes, what a run records -----------------------------------------------------
def test_overwrite_removes_only_what_clex_listed(shared, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, ppl_argv(shared, out))[0] == 0
    (out / "notes.txt").write_text("the user's")  # a file clex did not write, next to its results
    first = snapshot(out)
    code, _, err = cli(capsys, ppl_argv(shared, out))
    assert code == 2 and "already holds results" in one_line(err) and snapshot(out) == first
    (out / "ppl.png").write_bytes(b"edited")  # a listed file, changed since: kept, and named
    edited = snapshot(out)
    code, _, err = cli(capsys, ppl_argv(shared, out, "--overwrite", "--samples", "1"))
    assert code == 2 and "ppl.png" in one_line(err) and "nothing was removed" in one_line(err)
    assert snapshot(out) == edited
    (out / "ppl.png").rename(tmp_path / "kept.png")
    assert cli(capsys, ppl_argv(shared, out, "--overwrite", "--samples", "1"))[0] == 0
    assert (out / "notes.txt").read_text() == "the user's" and (tmp_path / "kept.png").read_bytes() == b"edited"
    assert json.loads((out / "results.json").read_text())["settings"]["samples"] == 1
    assert (out / "ppl.png").read_bytes() != b"edited"


def test_every_file_an_eval_writes_is_in_the_manifest(shared, tmp_path, capsys):
    ppl, passkey = tmp_path / "ppl", tmp_path / "passkey"
    assert cli(capsys, ppl_argv(shared, ppl, "--per-position"))[0] == 0
    assert cli(capsys, passkey_argv(shared["model"], passkey))[0] == 0
    for out, kind in ((ppl, "eval-ppl"), (passkey, "eval-passkey")):
        record = json.loads((out / MANIFEST).read_text())
        present = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
        assert record["kind"] == kind and sorted(record["entries"]) == present
    assert "partial.jsonl" not in json.loads((passkey / MANIFEST).read_text())["entries"]  # removed once complete
    assert sorted(p.name for p in passkey.iterdir()) == sorted(
        [MANIFEST, "results.json", "results.md", "predictions.jsonl", "passkey.png", "passkey_heatmap.png"])


# --- task-evaluation partial files -------------------------------------------------------------------------
def _killed_after(monkeypatch, cells: int) -> list:
    """Make the runner stop (Ctrl-C) after ``cells`` cells; returns the list of generated cells."""
    real, calls = GREEDY, []

    def counting(*args, **kwargs):
        if cells is not None and len(calls) >= cells:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "greedy_answers", counting)
    return calls


def test_partial_from_other_settings_reuses_nothing(tmp_path, capsys, monkeypatch):
    model = save_tiny(tmp_path / "model", L=64)
    out = tmp_path / "out"
    _killed_after(monkeypatch, 3)
    assert cli(capsys, passkey_argv(model, out, "--policy", "off", "--dtype", "float32"))[0] == 130
    partial = out / "partial.jsonl"
    assert len(partial.read_text().splitlines()) == 3 and not (out / "results.json").exists()
    before = snapshot(tmp_path)
    calls = _killed_after(monkeypatch, None)
    code, _, err = cli(capsys, passkey_argv(model, out, "--policy", "recompute", "--dtype", "bfloat16"))
    line = one_line(err)
    assert code == 2 and "holds finished cells of an evaluation with other settings" in line
    assert "policy: off → recompute" in line and "dtype: float32 → bfloat16" in line and "--overwrite" in line
    assert snapshot(tmp_path) == before and calls == []
    code, _, _ = cli(capsys, passkey_argv(model, out, "--policy", "recompute", "--dtype", "bfloat16", "--overwrite"))
    assert code == 0 and len(calls) == 4  # all 4 cells generated again: 0 reused
    assert {r["method"] for r in json.loads((out / "results.json").read_text())["rows"]} == {"vanilla", "pi:factor=2"}


def test_partial_with_the_same_settings_resumes_without_overwrite(tmp_path, capsys, monkeypatch):
    model = save_tiny(tmp_path / "model", L=64)
    out = tmp_path / "out"
    _killed_after(monkeypatch, 3)
    assert cli(capsys, passkey_argv(model, out))[0] == 130
    calls = _killed_after(monkeypatch, None)
    assert cli(capsys, passkey_argv(model, out))[0] == 0
    assert len(calls) == 1 and not (out / "partial.jsonl").exists()  # 3 cells reused, 1 generated


def test_partial_from_other_weights_is_refused(tmp_path, capsys, monkeypatch):
    model = save_tiny(tmp_path / "model", L=64)
    out = tmp_path / "out"
    _killed_after(monkeypatch, 2)
    assert cli(capsys, passkey_argv(model, out))[0] == 130
    save_tiny(model, seed=1, L=64)  # same config, other weights, in place
    before = snapshot(out)
    code, _, err = cli(capsys, passkey_argv(model, out))
    assert code == 2 and "other settings (weights:" in one_line(err) and snapshot(out) == before


def test_run_key_names_what_changes_a_score(tmp_path):
    from clex.data.tokens import ByteTokenizer

    model = save_tiny(tmp_path / "model", L=64)
    samples = [T.Sample([1, 2, 3], ["4"], 5, "passkey", 128)]
    key = T.run_key("passkey", str(model), ByteTokenizer(), samples, "rerotate", 8, torch.float32, "cpu")
    assert set(key) == {"kind", "prompts", "weights", "tokenizer", "policy", "dtype", "device", "batch_size",
                        "versions"}
    other = [T.Sample([1, 2, 3], ["4"], 5, "passkey", 128, stop_strings=("\n",))]
    assert T.run_key("passkey", str(model), ByteTokenizer(), other, "rerotate", 8, torch.float32, "cpu") != key


# --- data, token cache ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "inconsistent"])
def test_a_corrupt_token_cache_is_named_and_rebuilt(shared, tmp_path, capsys, damage):
    from clex import data as D

    docs = D.load_documents(str(shared["corpus"]))
    good = D.tokenize_documents(docs, D.ByteTokenizer())  # what `eval ppl --tokenizer bytes` caches
    (cache,) = (tmp_path / "cache" / "tokens").glob("*.npz")
    if damage == "garbage":
        cache.write_bytes(b"PK\x03\x04 not a zip at all")
    else:
        np.savez(cache, tokens=np.concatenate(good), offsets=np.array([0, 5]))
    code, _, err = cli(capsys, ppl_argv(shared, tmp_path / "out"))
    assert code == 0 and f"token cache {cache} is corrupt" in err and "rebuilding it" in err
    with np.load(cache) as f:
        assert np.array_equal(f["tokens"], np.concatenate(good))  # rebuilt
    assert all(math.isfinite(r["ppl"]) for r in json.loads((tmp_path / "out" / "results.json").read_text())["results"])


# --- eval ppl: a failure keeps the lengths that finished -----------------------------------------------------
def test_ppl_failing_at_the_longest_length_writes_the_finished_ones(shared, tmp_path, capsys, monkeypatch):
    from clex.eval import ppl as P

    real = P.evaluate_windows

    def nan_at_64(model, windows, stride, length, *rest):
        nll, count, per = real(model, windows, stride, length, *rest)
        return (float("nan") if length == 64 else nll), count, per

    monkeypatch.setattr(P, "evaluate_windows", nan_at_64)
    out = tmp_path / "out"
    code, _, err = cli(capsys, ppl_argv(shared, out))
    line = one_line(err)
    assert code == 2 and "method 'vanilla' at length 64: the loss is not finite" in line
    assert f"the 1 result that finished is in {out / 'results.json'}" in line
    payload = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert payload["complete"] is False and [(r["length"], math.isfinite(r["ppl"])) for r in payload["results"]] == [
        (32, True)]
    code, _, err = cli(capsys, ppl_argv(shared, out))  # incomplete results are results: kept unless --overwrite
    assert code == 2 and "already holds results" in one_line(err)


# --- methods in Python ----------------------------------------------------------------------------------------
def test_apply_refuses_a_parameter_given_twice():
    from tiny import make_model

    model = make_model("llama")
    before = model.config.to_dict()
    with pytest.raises(ValueError, match=r"method parameter\(s\) \['factor'\] given both in 'yarn:factor=2'"):
        clex.apply(model, "yarn:factor=2", factor=8)
    with pytest.raises(ValueError, match="given twice"):
        clex.apply(model, "yarn:factor=2,factor=8")
    with pytest.raises(ValueError, match=r"max_factor.*1 … 1024"):
        clex.apply(model, "clex", max_factor=10**9)
    assert model.config.to_dict() == before  # nothing changed


def test_clamp_false_says_it_refused():
    from tiny import make_model, tokens

    model = clex.apply(make_model("llama"), "clex", max_factor=2, clamp=False)
    with pytest.raises(ValueError, match=r"^refused: sequence length 48 exceeds .* clamp=False"):
        model(tokens(48))


# --- chat in a pipe ----------------------------------------------------------------------------------------
def test_chat_pipe_writes_one_line_per_message(shared, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\n" + "x" * 200 + "\nBye\n"))  # fits, blank, too long, fits
    code, out, err = cli(capsys, ["chat", "--model", shared["model"], "--tokenizer", "bytes", "--max-new-tokens", "4",
                              "--max-context", "160"])
    lines = out.split("\n")
    assert code == 0 and len(lines) == 5 and lines[-1] == ""  # 4 messages, 4 lines
    assert lines[1] == "" and lines[2] == ""  # the blank and the too-long message: empty lines, reasons on stderr
    assert err.count("beyond --max-context") == 1
    assert "empty message" in err and "beyond --max-context" in err


def test_chat_with_nan_logits_answers_an_empty_line_and_says_why(shared, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n"))
    code, out, err = cli(capsys, ["chat", "--model", shared["nan"], "--tokenizer", "bytes", "--max-new-tokens", "4",
                              "--max-context", "160"])
    assert code == 0 and out == "\n\n" and err.count("logits are NaN") == 2 and "Traceback" not in err
