"""The seam into transformers, for every supported family: equalities of logits, round trips, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as tf

import clex
from tiny import FAMILIES, L, clone, make_model, randomize_clex, tokens


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_inside_window_clex_equals_vanilla(family):
    model = make_model(family)
    vanilla = clone(model)
    clex.apply(model, "clex")
    randomize_clex(model)  # even a trained CLEX is plain RoPE for n <= L
    for n in (1, L // 2, L):
        ids = tokens(n, batch=2)
        torch.testing.assert_close(logits(model, ids), logits(vanilla, ids), rtol=0, atol=1e-5)


def test_untrained_clex_equals_stock_dynamic_ntk(family):
    """Independent reference: transformers' own dynamic rope with factor 2 uses α = 2n/L − 1."""
    model = make_model(family)
    stock = clone(model)
    clex.apply(model, "clex")
    clex.apply(stock, "dynamic", factor=2)
    assert not clex.clex_modules(stock)
    for k in (2, 3, 4):
        ids = tokens(k * L, seed=k)
        # fresh stock model each length: stock dynamic rope keeps its longest frequencies (stateful)
        fresh = clone(stock)
        torch.testing.assert_close(logits(model, ids), logits(fresh, ids), rtol=0, atol=1e-4)
    vanilla = make_model(family)
    ids = tokens(3 * L)
    assert (logits(model, ids) - logits(vanilla, ids)).abs().max() > 1e-4  # the scaling did something


def test_save_load_roundtrip_and_backward(family, tmp_path):
    model = make_model(family)
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model)
    ids = tokens(3 * L)
    want = logits(model, ids)
    model.save_pretrained(tmp_path)

    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = [k for k in f.keys() if "clex" in k]
    assert len(names) == 2 and all("clex_ode" in k for k in names)
    rope = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    rope = rope.get("full_attention", rope)
    assert rope["rope_type"] == "clex" and rope["max_factor"] == 4
    assert rope["original_max_position_embeddings"] == L

    for loader in (clex.from_pretrained, tf.AutoModelForCausalLM.from_pretrained):
        loaded = loader(tmp_path).eval()
        loaded.config._attn_implementation = model.config._attn_implementation
        torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=1e-5)

    # forward + backward: gradients reach the base model and both CLEX matrices
    loaded.train()
    out = loaded(ids, labels=ids)
    out.loss.backward()
    ode = clex.clex_modules(loaded)[0].clex_ode
    for p in (ode.up_proj, ode.down_proj):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_clex_with_extrapolated_positions(attn, checkpointing):
    model = make_model("llama", attn=attn)
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model)
    model.train()
    if checkpointing:
        # asks for the reentrant variant: clex forces non-reentrant, or CLEX would get no gradient
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    t = 3
    pos = clex.extrapolated_positions(L, t, torch.Generator().manual_seed(0))[None]
    ids = tokens(L)
    out = model(ids, position_ids=pos, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    ode = clex.clex_modules(model)[0].clex_ode
    for p in (ode.up_proj, ode.down_proj):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_training_forward_uses_theta_t_and_full_causal_attention():
    model = make_model("llama")
    clex.apply(model, "clex", max_factor=4)
    randomize_clex(model)
    pos = clex.extrapolated_positions(L, 4, torch.Generator().manual_seed(0), layout="chunks")[None]
    ids = tokens(L)
    mask = torch.ones_like(ids)
    base = logits(model, ids, position_ids=pos, attention_mask=mask)
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 64
    # with the explicit mask, the last token attends across the skip to the first token
    assert (logits(model, changed, position_ids=pos, attention_mask=mask)[0, -1] - base[0, -1]).abs().max() > 1e-6
    # the rotary module saw n = 4L, so t = 4: equal to cos/sin built from θ(4) at those positions
    rot = clex.clex_modules(model)[0]
    cos, _ = rot(torch.zeros(1), pos)
    torch.testing.assert_close(cos[0, :, : rot.rotary_dim // 2], torch.cos(pos[0, :, None] * rot.trajectory()[3]))


@pytest.mark.parametrize(
    "spec", ["pi:factor=4", "ntk:factor=4", "dynamic:factor=4", "yarn:factor=4", "llama3:factor=4"]
)
def test_stock_methods_match_transformers_own_config(spec):
    """A method switched by clex equals the same model built by transformers from that rope config."""
    model = make_model("llama")
    clex.apply(model, spec)
    rebuilt_config = tf.LlamaConfig.from_dict(model.config.to_dict())
    rebuilt_config._attn_implementation = "eager"
    rebuilt = tf.LlamaForCausalLM(rebuilt_config).eval()
    rebuilt.load_state_dict(model.state_dict())
    ids = tokens(3 * L)
    torch.testing.assert_close(logits(model, ids), logits(rebuilt, ids), rtol=0, atol=1e-6)
    assert type(rebuilt.model.rotary_emb) is type(model.model.rotary_emb)


def test_pi_is_linear_interpolation():
    model = make_model("llama")
    base_freq = model.model.rotary_emb.inv_freq.clone()
    clex.apply(model, "pi", factor=4)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, base_freq / 4)


def test_ntk_is_static_ntk_aware():
    model = make_model("llama")
    clex.apply(model, "ntk", factor=3)
    d = 8
    want = 1.0 / (10000.0 * 3 ** (d / (d - 2))) ** (torch.arange(0, d, 2).float() / d)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, want)


def test_longrope_takes_per_pair_factors():
    model = make_model("llama")
    base_freq = model.model.rotary_emb.inv_freq.clone()
    long = [1.0, 2.0, 4.0, 8.0]
    clex.apply(model, "longrope", long_factor=long, short_factor=[1.0] * 4, factor=4)
    ids = tokens(2 * L)
    logits(model, ids)  # beyond L: the long factors are switched in
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, base_freq / torch.tensor(long))


def test_gemma3_local_layers_keep_their_rope():
    model = make_model("gemma3_text")
    clex.apply(model, "clex")
    randomize_clex(model)
    rot = clex.clex_modules(model)[0]
    assert rot.layer_type == "full_attention"
    x, pos = torch.zeros(1), torch.arange(3 * L)[None]
    for got, want in zip(rot(x, pos, "sliding_attention"), rot.original(x, pos, "sliding_attention"), strict=True):
        assert torch.equal(got, want)
    rope = model.config.rope_parameters
    assert rope["sliding_attention"]["rope_type"] == "default" and rope["full_attention"]["rope_type"] == "clex"


def test_reapplying_clex_keeps_learned_weights_and_settings():
    model = make_model("llama")
    vanilla = clone(model)
    clex.apply(model, "clex", max_factor=4, act="silu", log_scale=True)
    randomize_clex(model)
    learned = clex.clex_modules(model)[0].clex_ode.down_proj.clone()
    clex.apply(model, "clex", t_rule="continuous")
    (module,) = clex.clex_modules(model)
    assert torch.equal(module.clex_ode.down_proj, learned)
    cfg = module.settings
    assert (cfg.t_rule, cfg.max_factor, cfg.act, cfg.log_scale) == ("continuous", 4, "silu", True)
    with pytest.warns(UserWarning, match="different field"):
        clex.apply(model, "clex", act="tanh")
    assert not clex.clex_modules(model)[0].clex_ode.down_proj.any()  # untrained again
    clex.apply(model, "vanilla")
    ids = tokens(3 * L)
    torch.testing.assert_close(logits(model, ids), logits(vanilla, ids), rtol=0, atol=0)


def test_bf16_loading_keeps_clex_weights_exact(tmp_path):
    model = make_model("llama")
    clex.apply(model, "clex")
    randomize_clex(model)
    want = clex.clex_modules(model)[0].clex_ode.down_proj.detach().clone()
    model.save_pretrained(tmp_path)
    for loader in (clex.from_pretrained, tf.AutoModelForCausalLM.from_pretrained):
        loaded = loader(tmp_path, dtype=torch.bfloat16)
        assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
        assert torch.equal(clex.clex_modules(loaded)[0].clex_ode.down_proj, want)
    model.to(torch.bfloat16)
    assert torch.equal(clex.clex_modules(model)[0].clex_ode.down_proj, want)  # values, not just dtype


def test_apply_does_not_touch_models_sharing_the_config():
    config = FAMILIES["llama"]()
    a, b = tf.LlamaForCausalLM(config), tf.LlamaForCausalLM(config)
    clex.apply(a, "clex")
    assert b.config.rope_parameters["rope_type"] == "default"
    assert a.config.rope_parameters["rope_type"] == "clex"
    assert a.model.config is a.config


def test_bf16_forward_is_finite():
    model = make_model("llama")
    clex.apply(model, "clex")
    model.to(torch.bfloat16)
    out = logits(model, tokens(3 * L))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64),
        tf.BloomConfig(n_layer=1, hidden_size=32, n_head=2, vocab_size=64),
    ],
)
def test_models_without_rope_are_refused(config):
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(clex.UnsupportedModelError, match=config.model_type) as err:
        clex.apply(model, "clex")
    assert "docs/families.md" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "method,params,name",
    [
        ("clex", dict(max_factor=0), "max_factor"),
        ("clex", dict(act="relu"), "act"),
        ("clex", dict(time_dt=0.0), "time_dt"),
        ("clex", dict(time_dt=-1.0), "time_dt"),
        ("clex", dict(param_factor=0), "param_factor"),
        ("clex", dict(bogus=1), "bogus"),
        ("warp", {}, "unknown method"),
        ("pi", {}, "factor"),
        ("pi", dict(factor=0.5), "factor"),
        ("yarn", dict(factor=float("nan")), "factor"),
        ("longrope", dict(long_factor=[1, -1, 1, 1], short_factor=[1] * 4), "long_factor"),
        ("clex", dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(method, params, name):
    model = make_model("llama")
    before = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    with pytest.raises(ValueError, match=name):
        clex.apply(model, method, **params)
    # nothing lost: the model is unchanged
    assert json.dumps(model.config.to_dict(), sort_keys=True, default=str) == before
    assert type(model.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"


def test_odd_rotary_dim_is_refused():
    config = tf.PhiConfig(
        **{
            **dict(
                vocab_size=64,
                hidden_size=40,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=L,
            )
        },
        partial_rotary_factor=0.3,
    )
    model = tf.AutoModelForCausalLM.from_config(config)  # head_dim 10 × 0.3 = 3 rotary dims
    with pytest.raises(ValueError, match="rotary"):
        clex.apply(model, "clex")


def test_nan_clex_weights_in_checkpoint_raise(tmp_path):
    model = make_model("llama")
    clex.apply(model, "clex")
    with torch.no_grad():
        clex.clex_modules(model)[0].clex_ode.up_proj[0, 0] = float("inf")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="NaN or inf"):
        clex.from_pretrained(tmp_path)  # at load
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    logits(loaded, tokens(L))  # inside L the CLEX path is not used
    with pytest.raises(ValueError, match="NaN or inf"):
        logits(loaded, tokens(2 * L))  # at the first use


def test_method_strings_parse():
    from clex.methods import parse_method

    assert parse_method("yarn:factor=8,beta_fast=32") == ("yarn", {"factor": 8, "beta_fast": 32})
    assert parse_method("clex:policy=continuous,log_scale=true") == (
        "clex", {"policy": "continuous", "log_scale": True}
    )
    with pytest.raises(ValueError, match="key=value"):
        parse_method("pi:8")
    assert set(clex.available_methods()) >= {
        "vanilla", "pi", "ntk", "dynamic", "yarn", "longrope", "llama3", "clex"
    }


def test_clex_config_over_plain_weights_initialises_clex_as_the_reference(tmp_path):
    """A checkpoint whose config says clex but that has no CLEX weights (e.g. a base model with an
    edited config) gets the reference init: W_down = 0, so it is exactly NTK with α = 2t − 1."""
    model = make_model("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "clex", "rope_theta": 10000.0, "max_factor": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    ode = clex.clex_modules(loaded)[0].clex_ode
    assert torch.equal(ode.down_proj, torch.zeros_like(ode.down_proj))
    bound = 1 / ode.up_proj.shape[0] ** 0.5
    assert ode.up_proj.abs().max() <= bound and ode.up_proj.abs().max() > bound / 2


def test_gapped_positions_without_a_mask_warn_once_and_name_the_fix():
    import warnings

    model = clex.apply(make_model("llama"), "clex").eval()
    ids = tokens(16)
    gapped = (torch.arange(16) * 3)[None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(ids, position_ids=torch.arange(16)[None], use_cache=False)  # contiguous: nothing to say
            model(ids, position_ids=gapped)  # with a KV cache transformers does not read gaps as packing
            model(ids, position_ids=gapped, attention_mask=torch.ones_like(ids), use_cache=False)  # the fix
            assert not [w for w in caught if "position_ids have gaps" in str(w.message)]
            unmasked = model(ids, position_ids=gapped, use_cache=False).logits
            model(ids, position_ids=gapped, use_cache=False)
            masked = model(ids, position_ids=gapped, attention_mask=torch.ones_like(ids), use_cache=False).logits
    said = [str(w.message) for w in caught if "position_ids have gaps" in str(w.message)]
    assert len(said) == 1 and "attention_mask=torch.ones_like(input_ids)" in said[0]
    assert not torch.allclose(unmasked, masked)  # what the warning is about: the logits differ


def _tiny(kind: str):
    common = {k: v for k, v in COMMON_TINY.items()}
    configs = {
        "cohere": lambda: tf.CohereConfig(**common),
        "cohere2": lambda: tf.Cohere2Config(**common, sliding_window=8,
                                            layer_types=["sliding_attention", "full_attention"]),
        "gpt_oss": lambda: tf.GptOssConfig(**common, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                                           sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: tf.Phi3Config(**common, pad_token_id=0),
        "gptj": lambda: tf.GPTJConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=16),
        "codegen": lambda: tf.CodeGenConfig(vocab_size=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                            n_positions=16),
    }
    torch.manual_seed(0)
    config = configs[kind]()
    config._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(config).eval()


COMMON_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=16)

REFUSED = [
    ("cohere", "clex", "model type 'cohere' rotates interleaved pairs (2i, 2i+1); CLEX builds the half-split layout"),
    ("cohere2", "clex", "model type 'cohere2' rotates interleaved pairs"),
    ("gpt_oss", "clex", "model type 'gpt_oss' rotates cos/sin in a layout of its own"),
    ("phi3", "yarn:factor=2", "method 'yarn:factor=2' on model type 'phi3': a checkpoint saved with it would not "
     "load back"),
    ("gptj", "vanilla", "model type 'gptj' applies its rotary embedding inside each attention layer"),
    ("codegen", "clex", "model type 'codegen' applies its rotary embedding inside each attention layer"),
]


@pytest.mark.parametrize("kind, method, message", REFUSED, ids=[f"{k}-{m}" for k, m, _ in REFUSED])
def test_a_layout_the_method_cannot_keep_right_is_refused_at_apply_and_changes_nothing(kind, method, message):
    model = _tiny(kind)
    ids = torch.arange(12)[None] % 64
    with torch.no_grad():
        before = model(ids).logits
    config = model.config.to_dict()
    with pytest.raises(clex.UnsupportedModelError, match=re.escape(message)):
        clex.apply(model, method)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before) and model.config.to_dict() == config


@pytest.mark.parametrize("kind", ["cohere", "cohere2"])
def test_interleaved_families_still_take_the_frequency_methods(kind, tmp_path):
    model = _tiny(kind)
    ids = torch.arange(12)[None] % 64
    with torch.no_grad():
        before = model(ids).logits
        clex.apply(model, "vanilla")
        assert torch.equal(model(ids).logits, before)
        clex.apply(model, "pi:factor=2")
        scaled = model(ids).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(clex.from_pretrained(tmp_path).eval()(ids).logits, scaled, rtol=0, atol=1e-6)


def test_policy_the_older_name_of_t_rule_is_still_accepted(tmp_path):
    """In a spec, as a keyword, and in a config saved before the rename: each gives the same CLEX model."""
    by_spec = clex.apply(make_model("llama"), "clex:policy=continuous")
    by_keyword = clex.apply(make_model("llama"), "clex", policy="continuous")
    for model in (by_spec, by_keyword):
        assert clex.clex_modules(model)[0].settings.t_rule == "continuous"
    with pytest.raises(ValueError, match="both given and differ"):
        clex.apply(make_model("llama"), "clex:t_rule=ceil", policy="continuous")
    by_keyword.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config["rope_parameters"]
    assert rope["t_rule"] == "continuous" and "policy" not in rope
    rope["policy"] = rope.pop("t_rule")  # as a config saved before the rename says it
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = clex.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert clex.clex_modules(loaded)[0].settings.t_rule == "continuous"
    x = tokens(3 * L)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, by_keyword(x).logits, rtol=0, atol=0)
