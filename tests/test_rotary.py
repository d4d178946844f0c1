"""The CLEX rotary module on its own: t policies, caching, cos/sin contract, training-time sampling."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import clex  # noqa: F401
from clex.positions import extrapolated_positions, sample_scale_factor, sample_training_positions
from clex.rotary import CLEXConfig, CLEXRotary

L = 32


def make_rotary(**overrides) -> CLEXRotary:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=L)
    settings = CLEXConfig(original_max_position_embeddings=L, **overrides)
    return CLEXRotary(LlamaRotaryEmbedding(config), settings)


def positions(n: int) -> torch.Tensor:
    return torch.arange(n)[None]


@pytest.mark.parametrize(
    "t_rule,n,t", [("ceil", 1, 1), ("ceil", 32, 1), ("ceil", 33, 2), ("ceil", 64, 2), ("ceil", 65, 3),
                   ("continuous", 16, 1), ("continuous", 48, 1.5), ("continuous", 100, 100 / 32)],
)
def test_scaling_factor_rules(t_rule, n, t):
    assert make_rotary(t_rule=t_rule).scaling_factor(n) == pytest.approx(t)


def test_beyond_max_factor_warns_once_and_clamps():
    rot = make_rotary(max_factor=2)
    x = torch.zeros(1)
    with pytest.warns(UserWarning, match="max_factor"):
        cos_far, _ = rot(x, positions(3 * L))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rot(x, positions(3 * L))  # second time: silent
    assert rot.scaling_factor(10 * L) == 2
    # the clamped frequencies are θ(max_factor): the same cos as a length inside 2L
    cos_in, _ = rot(x, positions(2 * L))
    torch.testing.assert_close(cos_far[:, : 2 * L], cos_in)


def test_clamp_false_raises():
    rot = make_rotary(max_factor=2, clamp=False)
    with pytest.raises(ValueError, match="clamp=False"):
        rot(torch.zeros(1), positions(2 * L + 1))


def test_cos_sin_match_the_replaced_module_inside_window():
    rot = make_rotary()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(1, dtype=dtype)
        got = rot(x, positions(L))
        want = rot.original(x, positions(L))
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype == dtype and g.shape == w.shape
            assert torch.equal(g, w)


def test_frequencies_follow_t_and_cache_tracks_parameter_updates():
    rot = make_rotary(max_factor=4)
    x = torch.zeros(1)
    cos2, _ = rot(x, positions(2 * L))
    expected = rot.trajectory()[1]
    torch.testing.assert_close(cos2[0, 5, : expected.numel()], torch.cos(5 * expected))
    grid_before = rot.trajectory().clone()
    with torch.no_grad():
        rot.clex_ode.down_proj.add_(0.1)  # an optimizer step is an in-place update like this
    assert not torch.allclose(rot.trajectory(), grid_before)
    # the cached grid equals a solve with gradients (the training path)
    with torch.enable_grad():
        solved = rot.frequencies(3.0)
    assert solved.requires_grad
    torch.testing.assert_close(solved.detach(), rot.trajectory()[2], rtol=1e-6, atol=0)


def test_continuous_t_between_grid_points():
    torch.manual_seed(0)
    rot = make_rotary(t_rule="continuous", max_factor=4)
    with torch.no_grad():
        rot.clex_ode.down_proj.normal_(0, 0.05)
        mid = rot.frequencies(2.5)  # continued from the cached grid point θ(2)
        assert not torch.allclose(mid, rot.trajectory()[1]) and not torch.allclose(mid, rot.trajectory()[2])
    with torch.enable_grad():
        direct = rot.frequencies(2.5).detach()  # solved from t = 1 with gradients
    torch.testing.assert_close(mid, direct, rtol=1e-6, atol=0)


def test_log_scale_scales_attention_logits():
    plain, scaled = make_rotary(), make_rotary(log_scale=True)
    n = 3 * L
    x = torch.zeros(1)
    cos, sin = plain(x, positions(n))
    cos_s, sin_s = scaled(x, positions(n))
    s = math.log(n) / math.log(L)
    # q·k after rotation is bilinear in (cos, sin): scaling both by √s scales every q·k by s
    torch.testing.assert_close(cos_s**2 + sin_s**2, torch.full_like(cos, s), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cos_s, cos * math.sqrt(s))


def test_nan_parameters_raise():
    rot = make_rotary()
    with torch.no_grad():
        rot.clex_ode.down_proj[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rot(torch.zeros(1), positions(2 * L))


@pytest.mark.parametrize(
    "overrides,name",
    [(dict(max_factor=0), "max_factor"), (dict(max_factor=2.5), "max_factor"), (dict(act="gelu"), "act"),
     (dict(time_dt=0), "time_dt"), (dict(t_rule="floor"), "t_rule"), (dict(log_scale="yes"), "log_scale")],
)
def test_bad_settings_name_themselves(overrides, name):
    with pytest.raises(ValueError, match=name):
        CLEXConfig(original_max_position_embeddings=L, **overrides)


# --- training-time sampling ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["scatter", "chunks"])
@pytest.mark.parametrize("t", [1, 2, 3, 8, 16])
def test_extrapolated_positions(layout, t):
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        pos = extrapolated_positions(L, t, generator=g, layout=layout)
        assert pos.shape == (L,) and pos.dtype == torch.int64
        assert pos[0] == 0 and pos[-1] == L * t - 1
        assert (pos[1:] > pos[:-1]).all()
        if t == 1:
            assert torch.equal(pos, torch.arange(L))
    # reproducible from the generator
    a = extrapolated_positions(L, t, torch.Generator().manual_seed(7), layout)
    b = extrapolated_positions(L, t, torch.Generator().manual_seed(7), layout)
    assert torch.equal(a, b)


def test_chunked_layout_keeps_contiguous_runs():
    pos = extrapolated_positions(L, 8, torch.Generator().manual_seed(0), "chunks", chunks=2)
    gaps = (pos[1:] - pos[:-1] != 1).sum().item()
    assert gaps <= 1  # two runs: at most one skip


def test_position_sampling_bad_input():
    with pytest.raises(ValueError, match="layout"):
        extrapolated_positions(L, 2, layout="random")
    with pytest.raises(ValueError, match="t must"):
        extrapolated_positions(L, 0)
    with pytest.raises(ValueError, match="length"):
        extrapolated_positions(1, 2)


def test_sample_scale_factor_is_uniform_over_1_to_max():
    g = torch.Generator().manual_seed(0)
    draws = [sample_scale_factor(8, g) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(draws), minlength=9)
    assert counts[0] == 0 and (counts[1:] > 400).all() and min(draws) == 1 and max(draws) == 8
    with pytest.raises(ValueError, match="max_factor"):
        sample_scale_factor(0)
    with pytest.raises(ValueError, match="sampling must be one of"):
        sample_scale_factor(8, g, "normal")


def test_sample_training_positions_pairs_t_with_its_span():
    g = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(50):
        t, pos = sample_training_positions(L, 4, g, layout="chunks")
        seen.add(t)
        assert pos[0] == 0 and pos[-1] == L * t - 1 and len(pos) == L
        assert make_rotary(max_factor=4).scaling_factor(int(pos.max()) + 1) == t
    assert seen == {1, 2, 3, 4}


@pytest.mark.parametrize("layout", ["scatter", "chunks"])
def test_training_longer_than_the_base_context(layout):
    """length = k·L (the reference's long regime): fractional ids spanning 0 … L·t − 1."""
    k, g = 4, torch.Generator().manual_seed(0)
    rot = make_rotary(max_factor=8)
    for t in (1, 2, 4, 8):
        pos = extrapolated_positions(k * L, t, g, layout, base_length=L)
        assert pos.dtype == torch.float32 and len(pos) == k * L
        assert pos[0] == 0 and pos[-1] == pytest.approx(L * t - 1) and (pos[1:] > pos[:-1]).all()
        assert rot.scaling_factor(math.ceil(pos.max().item()) + 1) == t
    # t = 1 is position interpolation by ~k; t = k spans the inference window 0 … length − 1
    pi = extrapolated_positions(k * L, 1, g, layout, base_length=L)
    torch.testing.assert_close(pi, torch.arange(k * L) * (L - 1) / (k * L - 1))
    assert extrapolated_positions(k * L, k, g, layout, base_length=L)[-1] == k * L - 1
