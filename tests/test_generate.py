"""Generation as t changes: frozen, rerotate and recompute against independent references."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers as tf
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

import clex
from tiny import make_model, randomize_clex

L = 16


def sharp_clex_model(family="llama", max_factor=8):
    """A random model with a large init (sharp attention: positions matter) and a trained-looking CLEX."""
    torch.manual_seed(0)
    model = make_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    clex.apply(model, "clex", max_factor=max_factor)
    randomize_clex(model, scale=0.3)
    return model.eval()


def prompt(n, batch=1, seed=0):
    return torch.randint(3, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


def gen(model, ids, cache_mode, new=3 * L, **kw):
    out = clex.generate(model, ids, cache_mode=cache_mode, max_new_tokens=new, do_sample=False, output_logits=True,
                        return_dict_in_generate=True, pad_token_id=0, eos_token_id=None, **kw)
    return out.sequences, torch.stack(out.logits, 1)  # [B, steps, vocab]


def full_forward_logits(model, seq, t=None):
    rot = clex.clex_modules(model)[0]
    rot.t_override = t
    try:
        with torch.no_grad():
            return model(seq).logits[:, -1]
    finally:
        rot.t_override = None


def test_frozen_equals_a_full_forward_at_the_fixed_t():
    model = sharp_clex_model()
    ids = prompt(L + 3)
    seq, logits = gen(model, ids, "frozen")
    T = clex.clex_modules(model)[0].scaling_factor(ids.shape[1] + 3 * L)
    assert T == 5  # ceil((L + 3 + 3L) / L)
    for k in range(logits.shape[1]):
        want = full_forward_logits(model, seq[:, : ids.shape[1] + k], t=T)
        torch.testing.assert_close(logits[:, k], want, rtol=0, atol=1e-5)


def test_recompute_equals_the_full_forward_of_each_prefix():
    model = sharp_clex_model()
    ids = prompt(L - 2)
    seq, logits = gen(model, ids, "recompute")  # crosses t = 2, 3, 4
    for k in range(logits.shape[1]):
        torch.testing.assert_close(logits[:, k], full_forward_logits(model, seq[:, : ids.shape[1] + k]), rtol=0,
                                   atol=1e-5)


class UnrotatedCache(DynamicCache):
    """The reference's semantics, written independently: keep keys un-rotated and rotate all of
    them with the current t at every step (O(n) per token)."""

    def __init__(self, model):
        super().__init__(config=model.config)
        self.rot = clex.clex_modules(model)[0]
        self.step_cos_sin = None
        self.raw: dict[int, torch.Tensor] = {}
        self.rot.register_forward_hook(lambda m, a, out: setattr(self, "step_cos_sin", out))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        cos, sin = (x[:, None] for x in self.step_cos_sin)
        unrotated = key_states * cos - rotate_half(key_states) * sin  # undo this step's rotation
        self.raw[layer_idx] = torch.cat([self.raw[layer_idx], unrotated], -2) if layer_idx in self.raw else unrotated
        _, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        n = self.raw[layer_idx].shape[-2]
        theta = self.rot.frequencies(self.rot.scaling_factor(n))
        angles = torch.arange(n, dtype=torch.float32)[:, None] * theta
        emb = torch.cat((angles, angles), -1)
        raw = self.raw[layer_idx]
        return raw * emb.cos() + rotate_half(raw) * emb.sin(), values


@pytest.mark.parametrize("t_rule", ["ceil", "continuous"])
def test_rerotate_equals_per_step_rerotation_of_unrotated_keys(t_rule):
    model = sharp_clex_model()
    clex.apply(model, "clex", t_rule=t_rule)  # keeps the weights; continuous: t changes every token
    ids = prompt(L - 3)
    seq, logits = gen(model, ids, "rerotate")  # crosses t = 2, 3, 4
    # teacher-forced emulation over the same tokens, stock cache policy off so the hook stays out
    rot = clex.clex_modules(model)[0]
    rot.cache_mode = "off"
    cache = UnrotatedCache(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(ids, past_key_values=cache, use_cache=True)
        emulated = [out.logits[:, -1]]
        for k in range(ids.shape[1], seq.shape[1] - 1):
            out = model(seq[:, k : k + 1], past_key_values=cache, use_cache=True)
            emulated.append(out.logits[:, -1])
    rot.cache_mode = "rerotate"
    torch.testing.assert_close(logits, torch.stack(emulated, 1), rtol=0, atol=1e-5)
    # and it is not the stock behaviour: keys left with stale frequencies give other logits
    stale_seq, stale = gen(model, ids, "off")
    assert (stale[:, L:] - logits[:, L:]).abs().max() > 1e-3


def test_plain_generate_uses_rerotate_and_static_cache_agrees():
    model = sharp_clex_model()
    ids = prompt(L - 3)
    seq, logits = gen(model, ids, "rerotate")
    plain = model.generate(ids, max_new_tokens=3 * L, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    torch.testing.assert_close(torch.stack(plain.logits, 1), logits, rtol=0, atol=0)
    static = model.generate(ids, max_new_tokens=3 * L, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
                            cache_implementation="static")
    torch.testing.assert_close(torch.stack(static.logits, 1), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache_mode", ["rerotate", "recompute"])
def test_left_padded_batch_across_several_t_boundaries(cache_mode):
    model = sharp_clex_model()
    short, long = prompt(L - 6, seed=1), prompt(L + 5, seed=2)
    pad = torch.zeros(1, long.shape[1] - short.shape[1], dtype=torch.long)
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros_like(pad), torch.ones_like(short)], 1), torch.ones_like(long)])
    seq, logits = gen(model, batch, cache_mode, new=2 * L, attention_mask=mask)  # t goes 2 → 4
    # the longer row decides t for the batch; alone, the longer row generates the same
    seq_long, logits_long = gen(model, long, cache_mode, new=2 * L)
    assert torch.equal(seq[1], seq_long[0])
    torch.testing.assert_close(logits[1], logits_long[0], rtol=0, atol=1e-4)
    assert (seq[0, -2 * L :] != 0).any() and torch.isfinite(logits).all()


def test_cache_kwarg_names_what_the_forward_takes():
    """transformers 5.24 renamed the KV-cache argument ``past_key_values`` to ``cache``: the re-rotation
    hook and ``recompute`` follow whichever name the installed release's decoder takes."""

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, past_key_values=None):  # 5.24: both, the old deprecated
            return input_ids

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            return input_ids

    assert clex.cache.cache_kwarg(New()) == "cache"
    assert clex.cache.cache_kwarg(Old()) == "past_key_values"
    model = sharp_clex_model()
    assert clex.cache.cache_kwarg(model.model) in inspect.signature(model.model.forward).parameters


def test_cache_mode_off_warns_and_a_bad_mode_raises():
    model = sharp_clex_model()
    with pytest.warns(UserWarning, match="t changed from 1 to 2"):
        gen(model, prompt(L - 2), "off", new=4)
    with pytest.raises(ValueError, match="cache_mode must be one of"):
        clex.generate(model, prompt(4), cache_mode="sometimes", max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        clex.generate(model, prompt(4), cache_mode="frozen")


def test_the_older_name_policy_still_sets_the_cache_mode():
    model = sharp_clex_model()
    ids = prompt(L - 2)
    new = clex.generate(model, ids, cache_mode="recompute", max_new_tokens=4, do_sample=False)
    old = clex.generate(model, ids, policy="recompute", max_new_tokens=4, do_sample=False)
    assert torch.equal(new, old)
    with pytest.raises(ValueError, match="cache_mode must be one of"):
        clex.generate(model, ids, policy="sometimes", max_new_tokens=2)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma3_text", "qwen3", "phi"])
def test_rerotated_keys_equal_a_fresh_prefill_at_the_new_t(family):
    """After t changes, cached keys of the first CLEX layer (whose inputs do not depend on t) equal
    those of a fresh prefill at the new t: partial rotary (gpt_neox, phi) rotates only its part, and
    Gemma 3 re-rotates its global layers only (its first, local layer is left as it was)."""
    model = sharp_clex_model(family)
    ids = prompt(L + 1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :L], past_key_values=cache, use_cache=True)  # t = 1
        model(ids[:, L:], past_key_values=cache, use_cache=True)  # n = L + 1: t = 2, the cache is re-rotated
        fresh = DynamicCache(config=model.config)
        model(ids, past_key_values=fresh, use_cache=True)  # everything at t = 2
    first_clex = 1 if family == "gemma3_text" else 0
    for layer in range(first_clex + 1):
        torch.testing.assert_close(cache.layers[layer].keys, fresh.layers[layer].keys, rtol=0, atol=1e-5)
    stale = DynamicCache(config=model.config)
    clex.clex_modules(model)[0].cache_mode = "off"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(ids[:, :L], past_key_values=stale, use_cache=True)
        model(ids[:, L:], past_key_values=stale, use_cache=True)
    assert (stale.layers[first_clex].keys - fresh.layers[first_clex].keys).abs().max() > 1e-4


def test_cli_generate_streams(tmp_path, capsys):
    model = sharp_clex_model()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "p.txt").write_text("0123456789:;<=>?")  # bytes below the tiny model's vocabulary of 64
    from clex.cli.main import main

    argv = ["generate", "--model", str(tmp_path / "m"), "--prompt-file", str(tmp_path / "p.txt"),
            "--max-new-tokens", "20", "--tokenizer", "bytes", "--policy", "rerotate"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert len(out.encode()) >= 20 and "0123456789" not in out  # streamed new tokens only
    (tmp_path / "p.txt").write_text("letters are beyond 64")
    assert main(argv) == 2 and "beyond the model's vocabulary" in capsys.readouterr().err


def test_tf_model_without_clex_generates_as_usual():
    model = make_model("llama")
    out = clex.generate(model, prompt(4), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    assert isinstance(model, tf.PreTrainedModel)
