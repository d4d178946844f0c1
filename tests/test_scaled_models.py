"""Methods on already-scaled models (Llama 3.x, Qwen + YaRN, Gemma 3, Phi-3 long): they start from the model as
shipped. Inside its context untrained CLEX, dynamic and vanilla are that model; the fixed-factor baselines scale
its own frequencies (checked against the same method on a plain twin); every result reloads exactly."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

import clex
from clex.layouts import UnsupportedModelError
from clex.models import rotary_modules, training_length
from clex.serve.export import export
from tiny import COMMON, randomize_clex, tokens

SMALL = {k: v for k, v in COMMON.items() if k != "max_position_embeddings"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "rope_theta": 10000.0}
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [1.0, 2.0, 4.5, 9.0],
            "rope_theta": 10000.0}


def _gemma3_linear():
    return tf.Gemma3TextConfig(
        **SMALL, max_position_embeddings=32, head_dim=8, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}},
    )


SCALED = {  # name -> (config, its context L)
    "llama3": (lambda: tf.LlamaConfig(**SMALL, max_position_embeddings=64, rope_parameters=dict(LLAMA3)), 64),
    # Qwen's own recipe: a yarn block, max_position_embeddings left at the original length
    "yarn": (lambda: tf.Qwen2Config(**SMALL, max_position_embeddings=16, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}), 64),
    "linear": (lambda: tf.LlamaConfig(**SMALL, max_position_embeddings=32, rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), 32),
    "longrope": (lambda: tf.Phi3Config(**SMALL, pad_token_id=0, max_position_embeddings=64,
                                       original_max_position_embeddings=16, rope_parameters=dict(LONGROPE)), 64),
    "gemma3": (_gemma3_linear, 32),
}
ADAPTIVE = ["vanilla", "clex", "clex:t_rule=continuous", "dynamic:factor=4"]
FIXED = ["pi:factor=2", "ntk:factor=2", "yarn:factor=2", "llama3:factor=2", "clex"]


def _refused(name: str, spec: str) -> bool:
    """Whether ``spec`` on ``name`` is refused at apply (asserted, with the reason in its line)."""
    reason = None
    if name == "longrope" and spec.startswith("dynamic"):
        reason = "'longrope' switches factor sets"  # dynamic NTK cannot keep that switch
    elif name == "longrope" and spec.startswith("yarn"):
        reason = "would not load back"  # Phi-3's config reads a yarn block as longrope
    if reason:
        with pytest.raises(UnsupportedModelError, match=reason):
            clex.apply(_model(name), spec)
    return reason is not None


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = SCALED[name][0]()
    config._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(config).eval()


def _twin(model, spec: str | None = None):
    twin = tf.AutoModelForCausalLM.from_config(model.config.__class__.from_dict(model.config.to_dict()))
    twin.config._attn_implementation = "eager"
    twin.load_state_dict(model.state_dict())
    return clex.apply(twin.eval(), spec) if spec else twin.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits


def _global_rotary(model):
    """(inv_freq, cos/sin scale) the global layers of ``model`` use at a length past any short/long switch."""
    module = next(m for _, _, m in rotary_modules(model))
    module = getattr(module, "original", module)
    prefix = "full_attention_" if hasattr(module, "full_attention_inv_freq") else ""
    args = ("full_attention",) if prefix else ()
    with torch.no_grad():
        module(torch.zeros(1), torch.arange(200)[None], *args)  # longrope: the long set, as at full context
    return getattr(module, f"{prefix}inv_freq").clone(), float(getattr(module, f"{prefix}attention_scaling"))


@pytest.mark.parametrize("spec", ADAPTIVE)
@pytest.mark.parametrize("name", SCALED)
def test_length_adaptive_methods_are_the_model_as_shipped_inside_its_context(name, spec):
    if _refused(name, spec):
        return
    shipped = _model(name)
    L = SCALED[name][1]
    assert training_length(shipped) == L
    model = _twin(shipped, spec)
    for n in (5, L // 2, L):  # longrope: below and above its original length 16
        ids = tokens(n, seed=n)
        torch.testing.assert_close(_logits(model, ids), _logits(shipped, ids), rtol=0, atol=1e-6)
    if spec != "vanilla":
        ids = tokens(2 * L)
        assert (_logits(model, ids) - _logits(_twin(shipped), ids)).abs().max() > 1e-4  # scaled beyond L


@pytest.mark.parametrize("spec", FIXED)
@pytest.mark.parametrize("name", SCALED)
def test_baselines_scale_the_models_own_frequencies(name, spec):
    """θ_method(scaled model) = θ_shipped · θ_method(plain twin) / θ_plain, cos/sin scales multiplied."""
    if _refused(name, spec):
        return
    shipped = _model(name)
    theta_b, scale_b = _global_rotary(shipped)
    flat = tf.AutoModelForCausalLM.from_config(_flat_config(shipped)).eval()
    theta_plain, _ = _global_rotary(flat)
    method_plain, scale_m = _global_rotary(clex.apply(flat, spec, original_max_position_embeddings=SCALED[name][1]))
    theta, scale = _global_rotary(_twin(shipped, spec))
    torch.testing.assert_close(theta, theta_b * method_plain / theta_plain, rtol=1e-5, atol=0)
    assert scale == pytest.approx(scale_b * scale_m, rel=1e-6)
    assert not torch.allclose(theta, theta_b) or spec == "clex"  # clex: θ(1) = θ_b inside L


def _flat_config(model):
    """``model``'s config with its global layers' scaling removed (the raw θ beneath it)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    rope = config.rope_parameters
    key = "full_attention" if "full_attention" in rope else None
    target = rope[key] if key else rope
    kept = {k: target[k] for k in ("rope_theta", "partial_rotary_factor") if k in target}
    if key:
        rope[key] = {"rope_type": "default", **kept}
    else:
        config.rope_parameters = {"rope_type": "default", **kept}
    config._attn_implementation = "eager"
    return config


@pytest.mark.parametrize("spec", ["vanilla", "clex", "pi:factor=2", "yarn:factor=2", "dynamic:factor=2"])
@pytest.mark.parametrize("name", SCALED)
def test_save_and_reload_are_exact_with_clex_and_plain_transformers(name, spec, tmp_path):
    if _refused(name, spec):
        return
    model = _twin(_model(name), spec)
    if spec == "clex":
        randomize_clex(model)
    model.save_pretrained(tmp_path)
    L = SCALED[name][1]
    ids = tokens(3 * L)
    expected = _logits(model, ids)
    for loader in (clex.from_pretrained, tf.AutoModelForCausalLM.from_pretrained):
        again = loader(tmp_path, attn_implementation="eager").eval()
        torch.testing.assert_close(_logits(again, ids), expected, rtol=0, atol=1e-6)
        assert training_length(again) == training_length(model)


@pytest.mark.parametrize("name", SCALED)
def test_each_method_starts_again_from_the_model_as_shipped(name):
    shipped = _model(name)
    once = _twin(shipped, "clex")
    twice = clex.apply(clex.apply(_twin(shipped), "pi:factor=2"), "clex")
    ids = tokens(3 * SCALED[name][1])
    torch.testing.assert_close(_logits(twice, ids), _logits(once, ids), rtol=0, atol=0)
    back = clex.apply(twice, "vanilla")
    torch.testing.assert_close(_logits(back, ids), _logits(shipped, ids), rtol=0, atol=0)
    assert back.config.to_dict()["rope_parameters"] == shipped.config.to_dict()["rope_parameters"]
    assert back.config.max_position_embeddings == shipped.config.max_position_embeddings


def test_composing_that_is_not_defined_is_refused():
    model = _model("longrope")
    before = json.dumps(model.config.to_dict(), sort_keys=True)
    with pytest.raises(UnsupportedModelError, match="'longrope' switches factor sets"):
        clex.apply(model, "dynamic:factor=2")
    config = tf.LlamaConfig(**SMALL, max_position_embeddings=32)
    config.rope_parameters = {"rope_type": "proportional", "factor": 2.0, "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.5}
    other = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="ships rope type 'proportional'"):
        clex.apply(other, "clex")
    clex.apply(other, "vanilla")  # the model as shipped: nothing to compose
    assert json.dumps(model.config.to_dict(), sort_keys=True) == before


@pytest.mark.parametrize("name", ["llama3", "yarn"])
def test_export_carries_the_composed_frequencies(name, tmp_path):
    """The stock longrope export reads the model's own scaling as its short factors and CLEX's θ(T) as its
    long ones, both against the raw θ: it equals the CLEX model inside L and at lengths in (L, 2L] at T = 2."""
    model = _twin(_model(name), "clex:max_factor=4")
    randomize_clex(model)
    model.save_pretrained(tmp_path / "clex")
    out = export(tmp_path / "clex", tmp_path / "stock", factor=2)
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "longrope" and "scaled_from" not in rope
    stock = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    L = SCALED[name][1]
    for n in (L // 2, L, 2 * L - 3, 2 * L):
        ids = tokens(n, seed=n)
        torch.testing.assert_close(_logits(stock, ids), _logits(model, ids), rtol=0, atol=1e-5)
