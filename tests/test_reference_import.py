"""Import of checkpoints written by the CLEX reference code (DAMO-NLP-SG/CLEX)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchdiffeq import odeint

import clex
from tiny import L, make_model, tokens


def write_reference_checkpoint(path, rope_theta: float, log_scale: bool, seed: int = 0):
    """A Llama checkpoint laid out as the reference saves it: rope_scaling {"type": "clex", …},
    top-level log_scale, and the ODE matrices under model.clex_layer.proj_func (row-vector layout)."""
    model = make_model("llama")
    model.config.rope_parameters["rope_theta"] = rope_theta
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = rope_theta
    config["rope_scaling"] = {"type": "clex", "max_factor": 8, "param_factor": 1, "act": "tanh",
                              "time_dt": 0.01, "factor": 1}
    config["log_scale"] = log_scale
    (path / "config.json").write_text(json.dumps(config))
    d = model.config.head_dim
    g = torch.Generator().manual_seed(seed)
    up = (torch.rand(d // 2, d, generator=g) * 2 - 1) / math.sqrt(d)
    down = torch.randn(d, d // 2, generator=g) * 0.1
    weights = load_file(path / "model.safetensors")
    weights["model.clex_layer.proj_func.ode_up_proj"] = up
    weights["model.clex_layer.proj_func.ode_down_proj"] = down
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return up.double(), down.double(), d


def reference_frequencies(up, down, d, rope_theta, max_factor):
    """The reference's own computation (clex_layer.py), in fp64: torchdiffeq RK4 at step 0.01 on
    σ(x @ up) @ down + delta/time with x = z + log θ_ntk(t), θ_ntk in base 10000."""
    index = torch.arange(0, d, 2, dtype=torch.float64)

    def proj(t, x):
        alpha = 1.0 if t < 1 else 2 * t - 1
        ntk_inv_freq = 1.0 / ((10000 * alpha ** (d / (d - 2))) ** (index / d))
        delta = -2 * index / (d - 2) / (10000 ** (index / d) * alpha ** (index / (d - 2) + 1))
        return torch.tanh((x + torch.log(ntk_inv_freq)) @ up) @ down + delta / ntk_inv_freq

    inv_freq = 1.0 / (rope_theta ** (index / d))
    grid = torch.arange(1.0, max_factor + 1.0, dtype=torch.float64)
    return torch.exp(odeint(proj, torch.log(inv_freq), grid, method="rk4", options={"step_size": 0.01}))


@pytest.mark.parametrize("rope_theta,log_scale", [(10000.0, False), (1e5, True)])
def test_reference_checkpoint_gives_reference_frequencies(tmp_path, rope_theta, log_scale):
    up, down, d = write_reference_checkpoint(tmp_path, rope_theta, log_scale)
    model = clex.from_pretrained(tmp_path).eval()
    (module,) = clex.clex_modules(model)
    cfg = module.settings
    assert (cfg.max_factor, cfg.time_dt, cfg.ode_base, cfg.log_scale) == (8, 0.01, 10000.0, log_scale)
    assert cfg.original_max_position_embeddings == L
    torch.testing.assert_close(module.clex_ode.up_proj.double(), up.T)
    want = reference_frequencies(up, down, d, rope_theta, 8)
    got = module.trajectory().double()
    assert ((got - want) / want).abs().max() < 1e-6
    assert ((want[-1] - want[0] / 15 ** (2 * torch.arange(0, d, 2) / (d - 2))).abs() > 1e-4).any()  # trained
    with torch.no_grad():
        out = model(tokens(3 * L)).logits
    assert torch.isfinite(out).all()
    # saved again by clex, the checkpoint is in clex's own layout and loads with plain transformers
    model.save_pretrained(tmp_path / "ours")
    import transformers as tf

    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(clex.clex_modules(again)[0].trajectory(), module.trajectory())


def test_from_pretrained_refuses_remote_code(tmp_path):
    with pytest.raises(ValueError, match="remote code"):
        clex.from_pretrained(tmp_path, trust_remote_code=True)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(OSError):
        clex.from_pretrained(tmp_path / "nope")
