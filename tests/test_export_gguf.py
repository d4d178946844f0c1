"""``clex export --to gguf`` and the fetched-model path: a GGUF built here → clex fetch's conversion → clex train
(CLEX, a few steps) → save → reload → export (longrope and GGUF), all offline.

The GGUF is read back with ``gguf.GGUFReader`` (keys, tensors, CLEX's factors). If llama-cpp-python is installed
(here, or in the engines' virtualenv that ``make test-engines`` builds), llama.cpp's logits are compared with the
CLEX model's; otherwise that test is skipped and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import clex
from clex.cli.main import main
from clex.data.fetch import gguf_to_safetensors
from clex.serve.export import ExportError, export, longrope_parameters
from tiny import randomize_clex, tiny_llama

gguf = pytest.importorskip("gguf")
from test_fetch import write_tiny_llama_gguf  # noqa: E402

L = 32
ROOT = Path(__file__).resolve().parents[1]
ENGINE_PYTHON = ROOT / ".engines" / "llamacpp" / "bin" / "python"


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> Path:
    """A tiny Llama written as GGUF and converted as `clex fetch` converts SmolLM2."""
    tmp = tmp_path_factory.mktemp("fetched")
    model = tiny_llama(vocab_size=257, hidden_size=64, intermediate_size=128, max_position_embeddings=L,
                       tie_word_embeddings=False)
    write_tiny_llama_gguf(tmp / "tiny.gguf", model)
    return gguf_to_safetensors(tmp / "tiny.gguf", tmp / "hf")


@pytest.fixture(scope="module")
def clex_dir(fetched, tmp_path_factory) -> Path:
    """The fetched model with a (randomised, so learned-looking) CLEX, saved."""
    out = tmp_path_factory.mktemp("clex") / "model"
    model = clex.from_pretrained(fetched)
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model, scale=0.3)
    model.save_pretrained(out)
    for item in fetched.glob("tokenizer*"):
        (out / item.name).write_bytes(item.read_bytes())
    return out


def _fields(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    keys = {}
    for name, field in reader.fields.items():
        value = field.contents()
        keys[name] = value
    tensors = {t.name: t for t in reader.tensors}
    return keys, tensors


def test_fetched_model_is_plain_and_trains_saves_exports(fetched, tmp_path):
    assert "quantization_config" not in json.loads((fetched / "config.json").read_text())
    corpus = tmp_path / "corpus.txt"
    words = ["the", "state", "of", "union", "is", "strong", "congress", "people"]
    corpus.write_text(" ".join(np.random.default_rng(0).choice(words, 2000)))
    from clex.training.loop import train
    from clex.training.options import TrainConfig

    run = train(TrainConfig(model=str(fetched), out=str(tmp_path / "run"),
                            method="clex:max_factor=4,original_max_position_embeddings=16",
                            data=str(corpus), train_length=16, steps=2, batch_size=1, lr=1e-3,
                            show_progress=False))
    model = clex.from_pretrained(run)
    assert clex.clex_modules(model) and "quantization_config" not in json.loads((run / "config.json").read_text())
    stock = export(run, tmp_path / "stock", factor=2)
    assert json.loads((stock / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"
    path = export(run, tmp_path / "model.gguf", to="gguf", factor=2)
    keys, tensors = _fields(path)
    assert keys["general.architecture"] == "llama" and "rope_factors_long.weight" in tensors


def test_gguf_carries_clex_factors_and_llama_layout(clex_dir, tmp_path):
    T = 3
    path = export(clex_dir, tmp_path / "m.gguf", to="gguf", factor=T)
    keys, tensors = _fields(path)
    assert keys["llama.context_length"] == T * L
    assert keys["llama.rope.scaling.original_context_length"] == L
    assert keys["llama.rope.scaling.type"] == "longrope"
    assert keys["llama.rope.dimension_count"] == 16 and keys["llama.rope.freq_base"] == 10000.0
    assert "llama.rope.scaling.factor" not in keys  # would scale every frequency by 1/factor in llama.cpp
    model = clex.from_pretrained(clex_dir)
    expected = np.asarray(longrope_parameters(model, T)["long_factor"], dtype=np.float32)
    module = clex.clex_modules(model)[0]
    np.testing.assert_allclose(expected, (module._base_inv_freq() / module.trajectory()[T - 1]).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(tensors["rope_factors_long.weight"].data), expected)
    np.testing.assert_array_equal(np.asarray(tensors["rope_factors_short.weight"].data), np.ones_like(expected))
    assert not np.allclose(expected, T)  # learned: not position interpolation
    # weights in llama.cpp's names and row order: q permuted for adjacent-pair rotation
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    from clex.serve.gguf import _permute

    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), _permute(q, 4))
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= set(tensors)
    assert not any("clex" in name or "rotary" in name for name in tensors)
    # tokenizer included
    assert keys["tokenizer.ggml.model"] == "gpt2" and len(keys["tokenizer.ggml.tokens"]) == 257
    assert keys["tokenizer.ggml.merges"] == ["t h"]


def test_gguf_of_an_already_scaled_model_carries_its_own_scaling(fetched, tmp_path):
    """On a Llama-3-scaled base CLEX's t = 1 is the shipped θ_b: the short factors carry θ / θ_b, the long ones
    θ / θ(T), both against the raw θ llama.cpp starts from."""
    model = clex.from_pretrained(fetched)
    model.config.rope_parameters = {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": L // 4,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 10000.0}
    model.save_pretrained(tmp_path / "scaled")  # the rotary buffers are rebuilt from this config on load
    scaled = clex.from_pretrained(tmp_path / "scaled")
    clex.apply(scaled, "clex", max_factor=4)
    randomize_clex(scaled, scale=0.3)
    scaled.save_pretrained(tmp_path / "clex")
    for item in fetched.glob("tokenizer*"):
        (tmp_path / "clex" / item.name).write_bytes(item.read_bytes())
    path = export(tmp_path / "clex", tmp_path / "m.gguf", to="gguf", factor=2)
    _, tensors = _fields(path)
    module = clex.clex_modules(scaled)[0]
    raw = 1.0 / 10000.0 ** (torch.arange(0, module.rotary_dim, 2).double() / module.rotary_dim)
    short = np.asarray(tensors["rope_factors_short.weight"].data)
    np.testing.assert_allclose(short, (raw / module._base_inv_freq().double()).numpy(), rtol=1e-6)
    assert short.max() > 1.5  # the model's own scaling, not ones
    np.testing.assert_allclose(np.asarray(tensors["rope_factors_long.weight"].data),
                               (raw / module.trajectory()[1].double()).numpy(), rtol=1e-6)


@pytest.mark.parametrize("outtype,ggml", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_gguf_outtypes(clex_dir, tmp_path, outtype, ggml):
    path = export(clex_dir, tmp_path / f"m-{outtype}.gguf", to="gguf", factor=2, outtype=outtype)
    keys, tensors = _fields(path)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == ggml
    assert tensors["rope_factors_long.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


@pytest.mark.parametrize("family", ["phi3", "mixtral"])
def test_gguf_other_families(family, fetched, tmp_path):
    common = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=L)
    if family == "phi3":
        config = tf.Phi3Config(**common, pad_token_id=0)
    else:
        config = tf.MixtralConfig(**common, num_local_experts=2, num_experts_per_tok=1)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model, scale=0.3)
    model.save_pretrained(tmp_path / "m")
    for item in fetched.glob("tokenizer*"):
        (tmp_path / "m" / item.name).write_bytes(item.read_bytes())
    keys, tensors = _fields(export(tmp_path / "m", tmp_path / "m.gguf", to="gguf", factor=2))
    arch = "phi3" if family == "phi3" else "llama"
    assert keys["general.architecture"] == arch and keys[f"{arch}.rope.scaling.original_context_length"] == L
    if family == "phi3":
        assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [64, 128]  # fused q, k, v (ne order)
        assert keys["phi3.rope.scaling.attn_factor"] == 1.0  # not llama.cpp's longrope default √(1 + ln T / ln L)
    else:
        assert tensors["blk.0.ffn_gate_exps.weight"].shape.tolist() == [64, 128, 2]
        assert tensors["blk.0.ffn_down_exps.weight"].shape.tolist() == [128, 64, 2]
        assert "blk.0.ffn_gate_inp.weight" in tensors and keys["llama.expert_count"] == 2


def test_gguf_refusals(clex_dir, tmp_path, capsys):
    model = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=L))
    clex.apply(model, "clex", max_factor=4)
    model.save_pretrained(tmp_path / "qwen2")
    with pytest.raises(ExportError, match="'qwen2' is not one of them"):
        export(tmp_path / "qwen2", tmp_path / "q.gguf", to="gguf", factor=2)
    with pytest.raises(ExportError, match="must end in .gguf"):
        export(clex_dir, tmp_path / "q", to="gguf", factor=2)
    with pytest.raises(ExportError, match="is the model directory .* or inside it"):
        export(clex_dir, clex_dir / "x.gguf", to="gguf", factor=2)
    with pytest.raises(ExportError, match="is the model directory .* or inside it"):
        export(clex_dir, clex_dir, factor=2)
    (tmp_path / "have.gguf").write_bytes(b"mine")
    with pytest.raises(ExportError, match="exists"):
        export(clex_dir, tmp_path / "have.gguf", to="gguf", factor=2)
    assert (tmp_path / "have.gguf").read_bytes() == b"mine"
    logscale = clex.from_pretrained(clex_dir)
    clex.apply(logscale, "clex", log_scale=True)
    logscale.save_pretrained(tmp_path / "ls")
    with pytest.raises(ExportError, match="log_scale"):
        export(tmp_path / "ls", tmp_path / "ls.gguf", to="gguf", factor=2)
    assert not (tmp_path / "q.gguf").exists() and not (tmp_path / "ls.gguf").exists()
    assert main(["export", "--model", str(tmp_path / "qwen2"), "--to", "gguf", "--factor", "2",
                 "--out", str(tmp_path / "c.gguf")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_export_cli_prints_the_engine_settings(clex_dir, tmp_path, capsys):
    assert main(["export", "--model", str(clex_dir), "--to", "gguf", "--factor", "2", "--outtype", "f16",
                 "--out", str(tmp_path / "c.gguf")]) == 0
    out = capsys.readouterr().out
    assert f"-c {2 * L}" in out and f"-c {L}" in out
    assert main(["export", "--model", str(clex_dir), "--factor", "4", "--out", str(tmp_path / "lr")]) == 0
    out = capsys.readouterr().out
    assert f"--max-model-len {4 * L}" in out and f"--max-model-len {L}" in out


LLAMA_CPP = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, ids, n_ctx = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=2, verbose=False)
llm.eval(ids)
print(json.dumps(np.asarray(llm.scores[: len(ids)], dtype=np.float64).tolist()))
"""


def _llama_cpp_python() -> str | None:
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        return str(ENGINE_PYTHON) if ENGINE_PYTHON.exists() else None


def test_llama_cpp_runs_the_gguf_like_the_clex_model(clex_dir, tmp_path):
    python = _llama_cpp_python()
    if python is None:
        pytest.skip("llama-cpp-python is not installed (`make test-engines` builds it in .engines/llamacpp)")
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True, check=False)
    if probe.returncode:
        pytest.skip(f"llama-cpp-python does not import in {python}: {probe.stderr.strip().splitlines()[-1:]}")
    T = 2
    path = export(clex_dir, tmp_path / "m.gguf", to="gguf", factor=T)
    model = clex.from_pretrained(clex_dir)
    ids = torch.randint(0, 257, (1, T * L), generator=torch.Generator().manual_seed(0))
    for n in ((T - 1) * L + 1, T * L):
        args = [python, "-c", LLAMA_CPP, str(path), json.dumps(ids[0, :n].tolist()), str(T * L)]
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        proc = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        theirs = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
        with torch.no_grad():
            ours = model(ids[:, :n]).logits[0].double()
        lp = torch.log_softmax(theirs, -1) - torch.log_softmax(ours, -1)
        assert lp.abs().max() < 1e-3, (n, lp.abs().max())


@pytest.mark.parametrize("family", ["mistral", "mixtral", "phi3"])
def test_llama_cpp_runs_other_families(family, fetched, tmp_path):
    python = _llama_cpp_python()
    if python is None:
        pytest.skip("llama-cpp-python is not installed (`make test-engines` builds it in .engines/llamacpp)")
    common = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=L)
    config = {"phi3": lambda: tf.Phi3Config(**common, pad_token_id=0),
              "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=2, num_experts_per_tok=1),
              "mistral": lambda: tf.MistralConfig(**common, sliding_window=None)}[family]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model, scale=0.3)
    model.save_pretrained(tmp_path / family)  # a directory named phi3: llama.cpp special-cases such names
    for item in fetched.glob("tokenizer*"):
        (tmp_path / family / item.name).write_bytes(item.read_bytes())
    T = 2
    path = export(tmp_path / family, tmp_path / f"{family}.gguf", to="gguf", factor=T)
    ids = torch.randint(0, 257, (1, T * L), generator=torch.Generator().manual_seed(0))
    args = [python, "-c", LLAMA_CPP, str(path), json.dumps(ids[0].tolist()), str(T * L)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        ours = model(ids).logits[0].double()
    assert (torch.log_softmax(theirs, -1) - torch.log_softmax(ours, -1)).abs().max() < 1e-3
