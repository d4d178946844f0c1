"""The Python API refuses bad arguments up front, in its own words.

Every public function checks its arguments before any work: a TypeError for the wrong kind of value, a
ValueError (the module's own subclass where it has one) for a bad value, each one line that names the
argument as Python spells it (``batch_size``, never ``--batch-size``), never a library's internal error.
The CLI cases run in-process: exit status 2, one line on stderr, nothing written, no temporary directory left.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import clex
import clex.loading
import clex.serve.export
from clex.cli.main import main
from clex.data.types import DataError
from clex.eval.harness import evaluate_harness
from clex.eval.ppl import evaluate_ppl
from clex.eval.retrieval import evaluate_passkey
from clex.loading import ModelLoadError, ModelNotFoundError, check_model_path
from clex.serve.export import ExportError, export
from clex.training.step import cosine_schedule, param_groups
from clex.training.trainer import CLEXDataCollator
from tiny import LLAMA, tiny_llama

L = LLAMA["max_position_embeddings"]  # 32: the tiny Llama's, as tiny_llama() builds it
VOCAB = LLAMA["vocab_size"]  # 256


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A plain tiny Llama, its CLEX twin and a small corpus on disk."""
    root = tmp_path_factory.mktemp("api")
    model = tiny_llama()
    model.save_pretrained(root / "base")
    clex.apply(model, "clex", max_factor=4)
    model.save_pretrained(root / "cx")
    words = ["the", "state", "of", "union", "is", "strong", "congress", "people", "nation", "peace"]
    (root / "corpus.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 3000)))
    return root


@pytest.fixture(scope="module")
def model() -> tf.LlamaForCausalLM:
    return tiny_llama()


def refused(call, kind: type[Exception], *words: str) -> str:
    """``call()`` raises ``kind`` (a TypeError is never a ValueError here, nor the reverse) with one line that
    holds every one of ``words`` and no command-line flag."""
    with pytest.raises(kind) as info:
        call()
    err = info.value
    other = ValueError if issubclass(kind, TypeError) else TypeError
    assert not isinstance(err, other), f"{type(err).__name__} is also a {other.__name__}"
    text = str(err)
    assert text.strip() and "\n" not in text, text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    assert " --" not in f" {text}", f"a CLI flag in an API error: {text!r}"
    return text


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files with their contents, links with their targets."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "link→" + os.readlink(path)
        elif path.is_file():
            out[key] = path.read_bytes().hex()[:64] + f":{path.stat().st_size}"
        else:
            out[key] = "dir"
    return out


def no_temp_left(root: Path) -> None:
    left = [str(p) for p in root.rglob(".clex-tmp-*")]
    assert not left, left


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# --- clex.apply -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target,method,kind,words",
    [
        ("string", "clex", TypeError, ("model must be", "str 'string'")),
        (None, "clex", TypeError, ("model must be", "got None")),
        ("MODEL", None, TypeError, ("method must be", "got None")),
        ("MODEL", 3, TypeError, ("method must be", "int 3")),
        ("MODEL", ["clex"], TypeError, ("method must be", "list")),
        ("MODEL", "warp", ValueError, ("unknown method 'warp'",)),
        ("MODEL", "yarn", ValueError, ("needs parameter(s) ['factor']",)),
    ],
)
def test_apply_refuses_bad_arguments(model, target, method, kind, words):
    before = dict(model.config.rope_parameters)
    refused(lambda: clex.apply(model if target == "MODEL" else target, method), kind, *words)
    assert model.config.rope_parameters == before and not clex.clex_modules(model)


# --- clex.from_pretrained ---------------------------------------------------------------------------------
def test_from_pretrained_refuses_a_missing_directory_in_its_own_words(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "no" / "such" / "dir"), "./no-such-model", "~/no-such-clex-model-x1", "a/b/c",
                 tmp_path / "missing"):
        text = refused(lambda p=path: clex.from_pretrained(p), ValueError, f"no model directory at {path}")
        assert "Repo id" not in text
        with pytest.raises(FileNotFoundError):  # also what a caller catching the OS error expects
            clex.from_pretrained(path)
        with pytest.raises(ModelNotFoundError):
            clex.from_pretrained(path)


def test_from_pretrained_argument_kinds(tmp_path, model):
    refused(lambda: clex.from_pretrained(None), TypeError, "path must be", "got None")
    refused(lambda: clex.from_pretrained(model), TypeError, "path must be", "LlamaForCausalLM")
    refused(lambda: clex.from_pretrained(3), TypeError, "path must be", "int 3")
    refused(lambda: clex.from_pretrained(""), ValueError, "path is empty")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    refused(lambda: clex.from_pretrained(tmp_path / "weights.bin"), ModelLoadError, "is a file, not a model directory")
    (tmp_path / "empty").mkdir()
    refused(lambda: clex.from_pretrained(tmp_path / "empty"), ModelLoadError, "has no config.json")


def test_hub_names_still_go_to_the_hub(monkeypatch):
    seen = []

    def fake_load_config(path):
        seen.append(path)
        raise RuntimeError("reached the hub")

    monkeypatch.setattr(clex.loading, "load_config", fake_load_config)
    for name in ("someorg/some-model", "gpt2"):
        check_model_path(name)  # no refusal: a hub name
        with pytest.raises(RuntimeError, match="reached the hub"):
            clex.from_pretrained(name)
    assert seen == ["someorg/some-model", "gpt2"]


def test_from_pretrained_loads_paths_it_accepts(world, monkeypatch):
    monkeypatch.chdir(world)
    for path in (world / "cx", "./cx", str(world / "cx")):
        assert clex.clex_modules(clex.from_pretrained(path))


# --- clex.generate ----------------------------------------------------------------------------------------
IDS = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize(
    "ids,kwargs,kind,words",
    [
        (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, ("input_ids is empty", "[1, 0]")),
        (torch.zeros(0, 3, dtype=torch.long), {}, ValueError, ("input_ids is empty", "[0, 3]")),
        (torch.tensor([1, 2, 3]), {}, ValueError, ("input_ids must be 2-D", "[3]", "input_ids[None]")),
        (torch.ones(1, 2, 3, dtype=torch.long), {}, ValueError, ("input_ids must be 2-D", "[1, 2, 3]")),
        (torch.tensor([[1.0, 2.0]]), {}, TypeError, ("input_ids must hold integer token ids", "float32")),
        (torch.tensor([[True]]), {}, TypeError, ("input_ids must hold integer token ids", "bool")),
        (torch.tensor([[1, -1]]), {}, ValueError, ("input_ids holds token id -1", f"vocabulary of {VOCAB}")),
        (torch.tensor([[1, VOCAB]]), {}, ValueError, (f"input_ids holds token id {VOCAB}", f"vocabulary of {VOCAB}")),
        (torch.tensor([[5, 10**6]]), {}, ValueError, ("token id 1000000", f"vocabulary of {VOCAB}")),
        ([[1, 2]], {}, TypeError, ("input_ids must be a torch.Tensor", "list")),
        (None, {}, TypeError, ("input_ids must be a torch.Tensor", "None")),
        (IDS, {"temperature": -1, "do_sample": True}, ValueError, ("temperature must be", "-1")),
        (IDS, {"temperature": -1}, ValueError, ("temperature must be", "-1")),  # greedy too: never silently ignored
        (IDS, {"temperature": float("nan")}, ValueError, ("temperature must be", "nan")),
        (IDS, {"temperature": float("inf")}, ValueError, ("temperature must be", "inf")),
        (IDS, {"temperature": "hot"}, TypeError, ("temperature must be", "str 'hot'")),
        (IDS, {"temperature": 0, "do_sample": True}, ValueError, ("temperature must be above 0", "do_sample")),
        (IDS, {"top_p": 0}, ValueError, ("top_p must be a number in (0, 1]",)),
        (IDS, {"top_p": 1.5}, ValueError, ("top_p must be a number in (0, 1]",)),
        (IDS, {"top_k": -1}, ValueError, ("top_k must be an integer >= 0",)),
        (IDS, {"max_new_tokens": 0}, ValueError, ("max_new_tokens must be an integer >= 1", "got 0")),
        (IDS, {"max_new_tokens": -1}, ValueError, ("max_new_tokens must be an integer >= 1", "got -1")),
        (IDS, {"max_new_tokens": 2.5}, TypeError, ("max_new_tokens must be an integer", "float 2.5")),
        (IDS, {"cache_mode": "sometimes"}, ValueError, ("cache_mode must be one of", "'sometimes'")),
        (IDS, {"attention_mask": torch.ones(1, 5)}, ValueError, ("attention_mask has shape [1, 5]", "[1, 3]")),
    ],
)
def test_generate_refuses_bad_arguments(model, ids, kwargs, kind, words):
    kwargs = {"max_new_tokens": 2, **kwargs}
    refused(lambda: clex.generate(model, ids, **kwargs), kind, *words)


def test_generate_refuses_what_is_not_a_model():
    refused(lambda: clex.generate("m", IDS, max_new_tokens=2), TypeError, "model must be", "str 'm'")
    refused(lambda: clex.generate(None, IDS, max_new_tokens=2), TypeError, "model must be", "None")


def test_generate_accepts_what_it_should(model):
    out = clex.generate(model, IDS.int(), max_new_tokens=2, do_sample=False)  # int32 ids are read as int64
    assert out.shape == (1, 5) and out.dtype == torch.long and out[0, :3].tolist() == [1, 2, 3]
    batch = torch.tensor([[0, VOCAB - 1], [7, 8]])
    assert clex.generate(model, batch, max_new_tokens=1, do_sample=False).shape == (2, 3)
    torch.manual_seed(0)
    sampled = clex.generate(model, IDS, max_new_tokens=2, do_sample=True, temperature=0.7, top_p=0.9, top_k=5)
    assert sampled.shape == (1, 5)
    assert clex.generate(model, IDS, max_new_tokens=2, temperature=0).shape == (1, 5)  # 0: greedy, as the CLI


# --- the evaluations --------------------------------------------------------------------------------------
def ppl_call(world, the_model, **overrides):
    kwargs = {"model": the_model, "methods": ["vanilla"], "lengths": [L], "data": str(world / "corpus.txt"),
              "samples": 1, "tokenizer": "bytes", "device": "cpu", "show_progress": False, **overrides}
    return lambda: evaluate_ppl(**kwargs)


PPL_CASES = [
    ({"model": 3}, TypeError, ("model must be", "int 3")),
    ({"model": None}, TypeError, ("model must be", "None")),
    ({"methods": None}, TypeError, ("methods must be", "None")),
    ({"methods": 3}, TypeError, ("methods must be", "int 3")),
    ({"methods": ["vanilla", 3]}, TypeError, ("methods must hold method names", "int 3")),
    ({"methods": []}, DataError, ("`methods` is empty",)),
    ({"methods": ""}, DataError, ("`methods` is empty",)),
    ({"methods": ["clex", "clex"]}, DataError, ("`methods` lists 'clex' twice",)),
    ({"methods": "warp"}, ValueError, ("unknown method 'warp'",)),
    ({"lengths": None}, TypeError, ("lengths must be", "None")),
    ({"lengths": []}, DataError, ("`lengths` is empty",)),
    ({"lengths": [1]}, DataError, ("`lengths` holds 1", "at least 2 tokens")),
    ({"lengths": [-8]}, DataError, ("`lengths` holds -8", "at least 2 tokens")),
    ({"lengths": [16.5]}, TypeError, ("lengths must hold", "float 16.5")),
    ({"lengths": [True]}, TypeError, ("lengths must hold", "bool True")),
    ({"samples": 0}, DataError, ("`samples` must be an integer >= 1", "got 0")),
    ({"samples": 1.5}, TypeError, ("samples must be an integer >= 1", "float 1.5")),
    ({"stride": 0}, DataError, ("`stride` must be an integer >= 1",)),
    ({"stride": 64}, DataError, ("`stride` 64 is larger than the window (length 32)",)),
    ({"mode": "zip"}, DataError, ("`mode` must be one of", "'zip'")),
    ({"data": None}, TypeError, ("data must be", "None")),
    ({"tokenizer": 5}, TypeError, ("tokenizer must be", "int 5")),
    ({"device": "tpu"}, DataError, ("`device` 'tpu' is not supported",)),
    ({"device": 3}, TypeError, ("device must be", "int 3")),
    ({"dtype": "int8"}, DataError, ("`dtype` must be auto or one of", "'int8'")),
]


@pytest.mark.parametrize("overrides,kind,words", PPL_CASES)
def test_evaluate_ppl_refuses_bad_arguments(world, model, overrides, kind, words):
    refused(ppl_call(world, model, **overrides), kind, *words)


def test_evaluate_ppl_reads_one_string_as_the_cli_does(world, model):
    """A bare string is one method or a comma-separated list, never its characters; one length is a list of one."""
    report = ppl_call(world, model, methods="vanilla", lengths=L)()
    assert report.methods == ["vanilla"] and report.lengths == [L] and len(report.results) == 1
    report = ppl_call(world, model, methods="vanilla,yarn:factor=2,beta_fast=16", lengths="32")()
    assert report.methods == ["vanilla", "yarn:factor=2,beta_fast=16"]
    assert [r.method for r in report.results] == report.methods


def passkey_call(model, **overrides):
    kwargs = {"methods": ["vanilla"], "lengths": [128], "depths": (50,), "trials": 1, "intro": False,
              "tokenizer": "bytes", "device": "cpu", "show_progress": False, **overrides}
    return lambda: evaluate_passkey(model, **kwargs)


@pytest.mark.parametrize(
    "overrides,kind,words",
    [
        ({"methods": None}, TypeError, ("methods must be", "None")),
        ({"methods": []}, DataError, ("`methods` is empty",)),
        ({"methods": [None]}, TypeError, ("methods must hold method names", "None")),
        ({"lengths": []}, DataError, ("`lengths` is empty",)),
        ({"lengths": ["4m"]}, DataError, ("length '4m' must be an integer",)),
        ({"batch_size": 0}, DataError, ("`batch_size` must be an integer >= 1",)),
        ({"batch_size": "8"}, TypeError, ("batch_size must be an integer >= 1", "str '8'")),
        ({"cache_mode": "sometimes"}, DataError, ("`cache_mode` must be one of", "'sometimes'")),
        ({"device": "tpu"}, DataError, ("`device` 'tpu' is not supported",)),
    ],
)
def test_task_evaluations_refuse_bad_arguments(model, overrides, kind, words):
    refused(passkey_call(model, **overrides), kind, *words)


def test_task_evaluations_read_one_string_as_the_cli_does(model):
    report = passkey_call(model, methods="vanilla", lengths="128")()
    assert report.methods == ["vanilla"] and report.lengths == [128] and {r.method for r in report.rows} == {"vanilla"}


@pytest.mark.parametrize(
    "overrides,kind,words",
    [
        ({"model": 3}, TypeError, ("model must be",)),
        ({"methods": None}, TypeError, ("methods must be", "None")),
        ({"methods": []}, DataError, ("`methods` is empty",)),
        ({"tasks": None}, TypeError, ("tasks must be", "None")),
        ({"tasks": []}, DataError, ("`tasks` is empty",)),
        ({"tasks": [1]}, TypeError, ("tasks must hold", "int 1")),
        ({"batch_size": 0}, DataError, ("`batch_size` must be an integer >= 1",)),
        ({"limit": 0}, DataError, ("`limit` must be positive",)),
        ({"limit": "all"}, TypeError, ("limit must be", "str 'all'")),
        ({"num_fewshot": -1}, DataError, ("`num_fewshot` must be 0 or more",)),
        ({"max_length": 0}, DataError, ("`max_length` must be an integer >= 1",)),
        ({"include_path": "/no/such/yamls"}, DataError, ("`include_path` '/no/such/yamls' does not exist",)),
        ({"device": "tpu"}, DataError, ("`device` 'tpu' is not supported",)),
    ],
)
def test_evaluate_harness_refuses_bad_arguments(model, overrides, kind, words):
    kwargs = {"model": model, "methods": ["vanilla"], "tasks": ["hellaswag"], "device": "cpu", **overrides}
    refused(lambda: evaluate_harness(**kwargs), kind, *words)


# --- the training helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clex_model() -> tf.LlamaForCausalLM:
    return clex.apply(tiny_llama(), "clex", max_factor=4)


@pytest.mark.parametrize(
    "call,kind,words",
    [
        (lambda m: CLEXDataCollator("model"), TypeError, ("model must be", "str 'model'")),
        (lambda m: CLEXDataCollator(m, collator=3), TypeError, ("collator must be", "int 3")),
        (lambda m: CLEXDataCollator(m, seed="0"), TypeError, ("seed must be an integer", "str '0'")),
        (lambda m: CLEXDataCollator(m, chunks=0), ValueError, ("chunks must be an integer >= 1",)),
        (lambda m: CLEXDataCollator(m, grad_accum=0), ValueError, ("grad_accum must be an integer >= 1",)),
        (lambda m: CLEXDataCollator(m, base_length=0), ValueError, ("base_length must be",)),
        (lambda m: CLEXDataCollator(m, base_length=8.0), TypeError, ("base_length must be", "float 8.0")),
        (lambda m: CLEXDataCollator(m, layout="spiral"), ValueError, ("layout must be one of",)),
        (lambda m: param_groups(m, lr=-1.0), ValueError, ("lr must be a finite number >= 0",)),
        (lambda m: param_groups(m, lr="2e-5"), TypeError, ("lr must be", "str '2e-5'")),
        (lambda m: param_groups(m, 1e-3, clex_lr=float("nan")), ValueError, ("clex_lr must be",)),
        (lambda m: param_groups(m, 1e-3, weight_decay=-0.1), ValueError, ("weight_decay must be",)),
        (lambda m: param_groups("m", 1e-3), TypeError, ("model must be",)),
        (lambda m: cosine_schedule(0, 0.1), ValueError, ("steps must be an integer >= 1",)),
        (lambda m: cosine_schedule(10.0, 0.1), TypeError, ("steps must be an integer >= 1", "float 10.0")),
        (lambda m: cosine_schedule(10, -0.1), ValueError, ("warmup must be",)),
        (lambda m: cosine_schedule(10, 0.1, clex_warmup="x"), TypeError, ("clex_warmup must be",)),
    ],
)
def test_training_helpers_refuse_bad_arguments(clex_model, call, kind, words):
    refused(lambda: call(clex_model), kind, *words)


@pytest.mark.parametrize(
    "kwargs,kind,words",
    [
        ({"clex_lr": -1.0}, ValueError, ("clex_lr must be",)),
        ({"clex_max_grad_norm": 0}, ValueError, ("clex_max_grad_norm must be",)),
        ({"clex_warmup": 2}, ValueError, ("clex_warmup must be", "[0, 1]")),
        ({"clex_method": 3}, TypeError, ("clex_method must be", "int 3")),
        ({"clex_method": "warp"}, ValueError, ("unknown method 'warp'",)),
    ],
)
def test_trainer_refuses_bad_clex_arguments_before_building(clex_model, tmp_path, kwargs, kind, words):
    from clex.training import CLEXTrainer

    args = tf.TrainingArguments(str(tmp_path / "run"), report_to=[], use_cpu=True)
    refused(lambda: CLEXTrainer(model=clex_model, args=args, **kwargs), kind, *words)
    assert not (tmp_path / "run").exists()


# --- the command line -------------------------------------------------------------------------------------
def test_info_on_a_missing_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "no" / "such" / "model"), "./no-such-model"):
        assert main(["info", "--model", path]) == 2
        err = one_error_line(capsys)
        assert f"no model directory at {path}" in err and "Repo id" not in err
    assert not list(tmp_path.iterdir())


def test_info_still_reads_a_model(world, capsys):
    assert main(["info", "--model", str(world / "cx")]) == 0
    assert "rope_type': 'clex'" in capsys.readouterr().out


def test_export_refuses_outtype_without_gguf(world, tmp_path, capsys):
    before = tree(tmp_path)
    argv = ["export", "--model", str(world / "cx"), "--to", "longrope", "--factor", "2", "--out", str(tmp_path / "o")]
    for outtype in ("q8_0", "f32"):  # an explicit f32 is refused too: --outtype means nothing for longrope
        assert main([*argv, "--outtype", outtype]) == 2
        assert f"--outtype {outtype!r} applies only to --to gguf" in one_error_line(capsys)
    assert main(argv[:3] + argv[5:] + ["--outtype", "f16"]) == 2  # --to left at its default, longrope
    one_error_line(capsys)
    assert tree(tmp_path) == before
    refused(lambda: export(world / "cx", tmp_path / "o", to="longrope", factor=2, outtype="q8_0"), ExportError,
            "`outtype` 'q8_0' applies only to `to` gguf")
    assert tree(tmp_path) == before


def _links(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "target").mkdir()
    links = {"to-a-directory": tmp_path / "link-dir", "dangling": tmp_path / "link-dangling",
             "gguf-dangling": tmp_path / "link.gguf"}
    links["to-a-directory"].symlink_to(tmp_path / "target")
    links["dangling"].symlink_to(tmp_path / "nowhere")
    links["gguf-dangling"].symlink_to(tmp_path / "nowhere.gguf")
    return links


@pytest.mark.parametrize("which", ["to-a-directory", "dangling", "gguf-dangling"])
def test_export_to_a_symlink_is_refused_before_any_work(world, tmp_path, capsys, which, monkeypatch):
    link = _links(tmp_path)[which]
    before = tree(tmp_path)
    loaded = []
    real = clex.from_pretrained
    monkeypatch.setattr(clex.serve.export, "from_pretrained", lambda *a, **k: loaded.append(a) or real(*a))
    to = ["--to", "gguf"] if which.startswith("gguf") else []
    assert main(["export", "--model", str(world / "cx"), *to, "--factor", "2", "--out", str(link)]) == 2
    err = one_error_line(capsys)
    assert "symbolic link" in err and str(link) in err
    assert not loaded  # refused before the model was read
    assert tree(tmp_path) == before
    no_temp_left(tmp_path)


def test_export_removes_its_temporary_directory_when_it_fails(world, tmp_path, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(world / "cx", tmp_path / "out", factor=2)
    assert not (tmp_path / "out").exists()
    no_temp_left(tmp_path)


def test_gguf_export_removes_its_temporary_file_when_it_fails(world, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from clex.serve import gguf as export_gguf

    def broken_vocab(*args, **kwargs):
        raise export_gguf.GGUFExportError("tokenizer cannot be written")

    monkeypatch.setattr(export_gguf, "_vocab", broken_vocab)
    refused(lambda: export(world / "cx", tmp_path / "m.gguf", to="gguf", factor=2), ExportError, "tokenizer")
    assert list(tmp_path.iterdir()) == []


def test_eval_cli_names_the_flags_the_api_names_as_arguments(world, tmp_path, capsys):
    """The same refusal speaks Python to a caller (``stride``) and the flag on the command line (``--stride``)."""
    base = ["eval", "ppl", "--model", str(world / "base"), "--data", str(world / "corpus.txt"), "--tokenizer", "bytes",
            "--no-progress", "--out", str(tmp_path / "o"), "--device", "cpu"]
    for extra, line in [
        (["--lengths", "32", "--stride", "64"], "--stride 64 is larger than the window (length 32)"),
        (["--lengths", "32", "--stride", "0"], "--stride must be an integer >= 1"),
        (["--lengths", ","], "--lengths is empty"),
        (["--lengths", "32", "--methods", "clex,clex"], "--methods lists 'clex' twice"),
        (["--lengths", "32", "--dtype", "int8"], "--dtype must be auto or one of"),
    ]:
        argv = base + extra
        assert main(argv) == 2, argv
        assert line in one_error_line(capsys)
    assert not (tmp_path / "o").exists()
