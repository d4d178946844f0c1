"""``clex export --to longrope``: stock transformers, without clex, computes what the CLEX model computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import clex
from clex.cli.main import main
from clex.serve.export import ExportError, export
from tiny import L, make_model, randomize_clex, tokens

STOCK = """
import json, sys
import torch, transformers
from transformers.utils import logging
logging.set_verbosity_error()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(name == "clex" or name.startswith("clex.") for name in sys.modules), "clex was imported"
ids = torch.tensor(json.loads(sys.argv[2]))
out = {}
with torch.no_grad():
    for n in json.loads(sys.argv[3]):
        out[n] = model(ids[:, :n], attention_mask=torch.ones_like(ids[:, :n])).logits.tolist()
print(json.dumps({"rope": model.config.rope_parameters, "max": model.config.max_position_embeddings,
                  "logits": out}))
"""


def _stock_logits(path, ids: torch.Tensor, lengths: list[int]) -> dict:
    proc = subprocess.run([sys.executable, "-c", STOCK, str(path), json.dumps(ids.tolist()), json.dumps(lengths)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _clex_model(family: str, max_factor: int = 4):
    model = make_model(family, attn="sdpa")
    clex.apply(model, "clex", max_factor=max_factor)
    randomize_clex(model, scale=0.3)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox"])  # plain, L kept twice, partial rotary
def test_exported_longrope_equals_clex_in_its_range(family, tmp_path):
    model = _clex_model(family)
    model.save_pretrained(tmp_path / "clex")
    T = 3
    export(tmp_path / "clex", tmp_path / "stock", factor=T)
    ids = tokens(T * L)
    lengths = [L, (T - 1) * L + 1, T * L]
    stock = _stock_logits(tmp_path / "stock", ids, [*lengths, L + 1])
    assert stock["rope"]["rope_type"] == "longrope" and stock["max"] == T * L
    grid = clex.clex_modules(model)[0].trajectory()
    assert not torch.allclose(grid[T - 1], grid[0] / T)  # learned: neither PI nor the NTK of untrained CLEX
    for n in lengths:
        with torch.no_grad():
            ours = model(ids[:, :n], attention_mask=torch.ones_like(ids[:, :n])).logits
        torch.testing.assert_close(torch.tensor(stock["logits"][str(n)]), ours, rtol=0, atol=1e-5)
    # between L and (T−1)·L the export keeps θ(T) where CLEX adapts t: they differ there (what is lost)
    n = L + 1
    with torch.no_grad():
        ours = model(ids[:, :n], attention_mask=torch.ones_like(ids[:, :n])).logits
    assert (torch.tensor(stock["logits"][str(n)]) - ours).abs().max() > 1e-4  # 10× the tolerance of the equality above


def test_export_refusals(tmp_path):
    plain = make_model("llama")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ExportError, match="does not use CLEX"):
        export(tmp_path / "plain", tmp_path / "o1", factor=2)
    model = _clex_model("llama", max_factor=4)
    model.save_pretrained(tmp_path / "clex")
    with pytest.raises(ExportError, match="exceeds the model's CLEX max_factor 4"):
        export(tmp_path / "clex", tmp_path / "o2", factor=5)
    for bad in (0, -1, 1.5):
        with pytest.raises(ExportError, match="integer t >= 1"):
            export(tmp_path / "clex", tmp_path / "o3", factor=bad)
    with pytest.raises(ExportError, match="`to` must be one of"):
        export(tmp_path / "clex", tmp_path / "o4", to="onnx", factor=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export(tmp_path / "clex", tmp_path / "full", factor=2)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    clex.apply(model, "clex", log_scale=True)
    model.save_pretrained(tmp_path / "logscale")
    with pytest.raises(ExportError, match="log_scale"):
        export(tmp_path / "logscale", tmp_path / "o5", factor=2)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4", "o5"))


def test_export_cli(tmp_path, capsys):
    _clex_model("llama").save_pretrained(tmp_path / "clex")
    assert main(["export", "--model", str(tmp_path / "clex"), "--factor", "2", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "model.safetensors").exists()
    assert main(["export", "--model", str(tmp_path / "clex"), "--factor", "9", "--out", str(tmp_path / "y")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
