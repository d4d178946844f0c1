"""The serving engines on a tiny CLEX export, when they are installed (``make test-engines`` builds them in
.engines/; the full comparison on a real model is ``engines/conformance.py``). Skipped, with a message, otherwise.

llama.cpp's own check is in test_export_gguf.py (fast, run whenever llama-cpp-python imports). vLLM takes minutes to
start on a CPU, so its test runs only with CLEX_ENGINE_TESTS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import clex
from clex.serve.export import export
from tiny import randomize_clex, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".engines" / "vllm" / "bin" / "python"
L = 32


def test_vllm_serves_the_longrope_export_like_the_clex_model(tmp_path):
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM is not installed (`make test-engines` builds it in .engines/vllm)")
    if os.environ.get("CLEX_ENGINE_TESTS") != "1":
        pytest.skip("vLLM takes minutes to start on a CPU: set CLEX_ENGINE_TESTS=1 to run this test")
    pytest.importorskip("gguf")
    from clex.data.fetch import gguf_to_safetensors
    from test_fetch import write_tiny_llama_gguf

    model = tiny_llama(vocab_size=257, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                       max_position_embeddings=L, tie_word_embeddings=False)
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", model)  # a model with a tokenizer (vLLM's)
    base = gguf_to_safetensors(tmp_path / "tiny.gguf", tmp_path / "base")
    model = clex.from_pretrained(base).eval()
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model, scale=0.3)
    model.save_pretrained(tmp_path / "clex")
    for item in base.glob("tokenizer*"):
        (tmp_path / "clex" / item.name).write_bytes(item.read_bytes())
    T = 2
    export(tmp_path / "clex", tmp_path / "stock", factor=T)
    ids = torch.randint(0, 257, (T * L,), generator=torch.Generator().manual_seed(0)).tolist()
    n = T * L - 1  # vLLM needs room for one output token
    job = {"model": str(tmp_path / "stock"), "ids": ids,
           "runs": [{"name": "fp32", "max_model_len": T * L, "dtype": "float32", "lengths": [n]}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([str(VLLM_PYTHON), str(ROOT / "engines" / "run_vllm.py"), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    theirs = torch.tensor(json.loads((tmp_path / "out.json").read_text())["fp32"]["lengths"][str(n)]["lp"])
    x = torch.tensor(ids[:n])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
    ours = logp.gather(-1, x[0, 1:, None])[:, 0]
    assert (theirs.double() - ours).abs().max() < 1e-3
