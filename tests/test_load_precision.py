"""Load precision: CLEX's matrices and the θ its path starts from stay exact fp32 whatever the model's dtype,
for reference-format checkpoints too; the reference's first config layout (no act, no time_dt) reads as SiLU, 0.01."""

from __future__ import annotations

import json

import pytest
import torch
from torchdiffeq import odeint

import clex
from clex.loading import ModelLoadError
from test_reference_import import write_reference_checkpoint
from tiny import L, make_model, randomize_clex, tokens


def _theta_grid(model) -> torch.Tensor:
    return clex.clex_modules(model)[0].trajectory().clone()


def test_reference_checkpoint_in_bf16_keeps_fp32_clex(tmp_path):
    write_reference_checkpoint(tmp_path, 1e4, False)
    exact = _theta_grid(clex.from_pretrained(tmp_path))
    model = clex.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ode = clex.clex_modules(model)[0].clex_ode
    assert ode.up_proj.dtype == ode.down_proj.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_theta_grid(model), exact, rtol=0, atol=0)


def test_ours_in_bf16_keeps_fp32_clex(tmp_path):
    model = make_model("llama")
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model, scale=0.3)
    model.save_pretrained(tmp_path)
    loaded = clex.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert clex.clex_modules(loaded)[0].clex_ode.up_proj.dtype == torch.float32
    torch.testing.assert_close(_theta_grid(loaded), _theta_grid(model), rtol=0, atol=0)


def test_to_bf16_starts_the_path_from_exact_theta():
    model = make_model("llama")
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model, scale=0.3)
    exact = _theta_grid(model)
    module = clex.clex_modules(model)[0]
    theta = module._base_inv_freq().clone()
    model.to(torch.bfloat16)
    assert module.original.inv_freq.dtype == torch.bfloat16  # the wrapped rotary's buffer is rounded …
    assert not torch.equal(module.original.inv_freq.float(), theta)
    assert torch.equal(module._base_inv_freq(), theta)  # … but CLEX's θ is not
    torch.testing.assert_close(_theta_grid(model), exact, rtol=0, atol=0)
    with torch.no_grad():
        out = model(tokens(3 * L)).logits  # still runs in bf16, at t = 3
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _reference_silu_frequencies(up, down, d, rope_theta, max_factor):
    """The reference's first version (SiLU, RK4 step 0.01), in fp64 with torchdiffeq."""
    index = torch.arange(0, d, 2, dtype=torch.float64)

    def proj(t, x):
        alpha = 1.0 if t < 1 else 2 * t - 1
        ntk_inv_freq = 1.0 / ((10000 * alpha ** (d / (d - 2))) ** (index / d))
        delta = -2 * index / (d - 2) / (10000 ** (index / d) * alpha ** (index / (d - 2) + 1))
        return torch.nn.functional.silu((x + torch.log(ntk_inv_freq)) @ up) @ down + delta / ntk_inv_freq

    inv_freq = 1.0 / (rope_theta ** (index / d))
    grid = torch.arange(1.0, max_factor + 1.0, dtype=torch.float64)
    return torch.exp(odeint(proj, torch.log(inv_freq), grid, method="rk4", options={"step_size": 0.01}))


def test_reference_first_layout_reads_as_silu_and_dt_001(tmp_path):
    up, down, d = write_reference_checkpoint(tmp_path, 1e4, False)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_scaling"]["act"], config["rope_scaling"]["time_dt"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = clex.from_pretrained(tmp_path)
    cfg = clex.clex_modules(model)[0].settings
    assert (cfg.act, cfg.time_dt) == ("silu", 0.01)
    expected = _reference_silu_frequencies(up, down, d, 1e4, 8).float()
    torch.testing.assert_close(_theta_grid(model), expected, rtol=2e-5, atol=0)


@pytest.mark.parametrize("drop", ["act", "time_dt"])
def test_reference_layout_with_one_of_the_two_keys_is_refused(tmp_path, drop):
    write_reference_checkpoint(tmp_path, 1e4, False)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_scaling"][drop]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=f"not '{drop}'"):
        clex.from_pretrained(tmp_path)
