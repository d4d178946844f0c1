"""LoRA runs reload anywhere: the base recorded so that any working directory finds it, a missing or in-memory
base named in one line, CLEX trainable after peft's ``get_peft_model`` and restored on a model peft's own
loaders built, and ``clex export`` of an adapter run."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf

import clex
from clex.cli.main import main
from tiny import save_llama

LORA = "4,8,q_proj,v_proj"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Llama (L = 32) and a LoRA CLEX run trained on it, started from the model's folder with relative
    paths (as a user types them)."""
    root = tmp_path_factory.mktemp("adapters")
    save_llama(root / "base", max_position_embeddings=32)
    (root / "corpus.txt").write_text(" ".join(["the state of the union is strong"] * 400))
    here = os.getcwd()
    os.chdir(root)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CLEX_CACHE", str(root / "cache"))
            assert main(["train", "--model", "base", "--data", "corpus.txt", "--tokenizer", "bytes", "--method",
                         "clex:max_factor=4", "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--lora", LORA,
                         "--out", "lora", "--no-progress"]) == 0
    finally:
        os.chdir(here)
    return root


def _logits(model, n: int = 96) -> torch.Tensor:
    ids = torch.arange(n)[None] % 256
    with torch.no_grad():
        return model.eval()(ids, use_cache=False).logits


def test_the_base_is_recorded_so_any_working_directory_reloads_the_run(run, tmp_path, monkeypatch):
    recorded = json.loads((run / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((run / "base").resolve())
    monkeypatch.chdir(tmp_path)  # elsewhere
    here = _logits(clex.from_pretrained(run / "lora"))
    adapter = json.loads((run / "lora" / "adapter_config.json").read_text())
    moved = tmp_path / "copy"
    moved.mkdir()
    for item in (run / "lora").iterdir():
        if not item.name.startswith("."):
            (moved / item.name).write_bytes(item.read_bytes())
    # an adapter whose base is recorded relative to the adapter itself loads from anywhere too
    (moved / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": os.path.relpath(
        run / "base", moved)}))
    assert torch.equal(_logits(clex.from_pretrained(moved)), here)


@pytest.mark.parametrize("base, message", [
    ("/no/such/base", "names the base model /no/such/base, which is not there"),
    ("./gone", "names the base model ./gone, which is not there"),
    (None, "names no base model (the adapter was trained on a model built in memory)"),
])
def test_a_missing_or_in_memory_base_is_named_in_one_line(run, tmp_path, capsys, base, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for item in (run / "lora").iterdir():
        if not item.name.startswith("."):
            (adapter / item.name).write_bytes(item.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    with pytest.raises(clex.ModelLoadError, match="adapter_config.json " + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        clex.from_pretrained(adapter)
    assert main(["info", "--model", str(adapter)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0]


def test_peft_s_own_loader_drops_clex_and_restore_clex_puts_it_back(run):
    from peft import AutoPeftModelForCausalLM

    ours = _logits(clex.from_pretrained(run / "lora"))
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(run / "lora"))
    assert not torch.allclose(_logits(theirs), ours, atol=1e-4)  # beyond L: no CLEX, other frequencies
    clex.restore_clex(theirs, run / "lora")
    torch.testing.assert_close(_logits(theirs), ours, rtol=0, atol=1e-5)  # merged vs unmerged LoRA: rounding


def test_get_peft_model_freezes_clex_and_unfreeze_clex_trains_it_again(run):
    from peft import LoraConfig, get_peft_model

    model = clex.apply(tf.AutoModelForCausalLM.from_pretrained(run / "base"), "clex", max_factor=4)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ode = [p for m in clex.clex_modules(peft_model) for p in m.clex_ode.parameters()]
    assert ode and not any(p.requires_grad for p in ode)
    assert clex.unfreeze_clex(peft_model) is peft_model and all(p.requires_grad for p in ode)
    with pytest.raises(TypeError, match="model must be a transformers or peft model"):
        clex.unfreeze_clex("lora")


def test_export_of_an_adapter_run_merges_it_and_names_its_serving_settings(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--model", str(run / "lora"), "--factor", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "--max-model-len 64" in printed
    exported = tf.AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.rope_parameters["rope_type"] == "longrope" and not (out / "adapter_config.json").exists()


def test_restore_clex_refuses_what_is_not_a_model_or_a_method_file(run, tmp_path):
    with pytest.raises(TypeError, match="model must be a transformers or peft model"):
        clex.restore_clex("lora", run / "lora")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "clex_method.json").write_text('{"method": 7}')
    model = tf.AutoModelForCausalLM.from_pretrained(run / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(clex.ModelLoadError, match="clex_method.json does not name a method"):
        clex.restore_clex(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
