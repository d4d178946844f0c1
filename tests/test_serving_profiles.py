"""CLEX profiles for serving engines (``clex_vllm.profiles``, written by ``clex export --to longrope``): each table
slice is clex's own cos/sin at that t, the admission rule at every boundary, and the export round trip. No engine
is needed; ``make test-engines`` serves the same profiles through vLLM."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import clex
from clex.cli.main import main
from clex.serve.export import export
from clex_vllm.profiles import CONFIG_KEY, ProfileError, Profiles, offset
from tiny import L, make_model, randomize_clex

T = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A CLEX Llama with learned-looking (random) ODE weights, and its longrope export at T."""
    root = tmp_path_factory.mktemp("profiles")
    model = make_model("llama")
    clex.apply(model, "clex", max_factor=T)
    randomize_clex(model, scale=0.3)
    model.save_pretrained(root / "clex")
    export(root / "clex", root / "export", factor=T)
    return model, root


def _profiles(root: Path) -> Profiles:
    return Profiles.from_config(json.loads((root / "export" / "config.json").read_text())[CONFIG_KEY])


def test_each_table_slice_is_clex_cos_sin_at_that_t(exported):
    model, root = exported
    profiles = _profiles(root)
    table = profiles.cos_sin_table()
    half = profiles.rotary_dim // 2
    assert table.shape == (profiles.rows, profiles.rotary_dim) and profiles.rows == L * T * (T + 1) // 2
    rot = clex.clex_modules(model)[0]
    x = torch.zeros(1, 1, dtype=torch.float32)
    for t in range(1, T + 1):
        rot.t_override = float(t)
        try:
            cos, sin = rot(x, torch.arange(t * L)[None])
        finally:
            rot.t_override = None
        part = table[offset(t, L) : offset(t, L) + t * L]
        assert torch.equal(part[:, :half], cos[0, :, :half]) and torch.equal(part[:, half:], sin[0, :, :half])
    # the slices differ: each t reads its own θ (a table of one θ repeated would pass the loop above only at t = 1)
    assert not torch.equal(table[offset(2, L) : offset(2, L) + L], table[:L])


def test_export_round_trip_carries_clex_theta_exactly(exported):
    model, root = exported
    config = json.loads((root / "export" / "config.json").read_text())
    profiles = _profiles(root)
    rot = clex.clex_modules(model)[0]
    assert (profiles.L, profiles.T, profiles.attention_scaling) == (L, T, rot._attention_scaling())
    for t in range(1, T + 1):
        assert torch.equal(torch.tensor(profiles.inv_freq[t - 1], dtype=torch.float32), rot.frequencies(float(t)))
    assert profiles.to_config() == config[CONFIG_KEY]
    assert config["rope_parameters"]["rope_type"] == "longrope"  # the stock fields stay for engines without it


def test_admission_rule_at_every_boundary():
    p = Profiles(L=L, T=T, inv_freq=((1.0,),) * T)
    assert p.profile_for(L - 1, 1) == 1  # n + max_tokens = L
    assert p.profile_for(L, 1) == 2  # L + 1
    assert p.profile_for(2 * L - 8, 8) == 2 and p.profile_for(2 * L - 8, 9) == 3
    assert p.profile_for(T * L - 1, 1) == T  # T·L
    with pytest.raises(ProfileError, match=r"= 65 exceeds the 4·16 = 64 tokens"):
        p.profile_for(T * L, 1)  # T·L + 1
    assert p.profile_for(3, 1, requested=3) == 3  # a client may raise t …
    assert p.profile_for(3 * L, 1, requested=2) == 4  # … never lower it
    for bad in (0, T + 1, 2.0, True, "2"):
        with pytest.raises(ProfileError, match="clex_t must be an integer in 1 … 4"):
            p.profile_for(3, 1, requested=bad)


def test_cache_salt_names_the_profile_and_keeps_the_clients():
    p = Profiles(L=L, T=2, inv_freq=((1.0, 0.5), (0.5, 0.25)))
    assert p.salt(1, None) != p.salt(2, None) and p.salt(1, None) == p.salt(1, None)
    assert p.salt(2, "tenant-a") == f"tenant-a|{p.tag(2)}" and p.salt(2, "tenant-a") != p.salt(2, "tenant-b")
    other = Profiles(L=L, T=2, inv_freq=((1.0, 0.5), (0.5, 0.2)))  # another model's θ(2): another key
    assert other.tag(2) != p.tag(2) and other.tag(1) == p.tag(1)


@pytest.mark.parametrize(
    ("change", "named"),
    [({"format": 2}, "format is 2"), ({"L": 0}, "L must be"), ({"T": 3}, "list of T = 3"),
     ({"inv_freq": [[1.0], [1.0, 2.0]]}, "one length"), ({"inv_freq": [[1.0], [float("nan")]]}, "finite positive"),
     ({"attention_scaling": -1}, "attention_scaling"), ({"T": True}, "T must be")],
)
def test_a_malformed_entry_is_one_line_naming_the_field(change, named):
    entry = {"format": 1, "L": L, "T": 2, "inv_freq": [[1.0], [0.5]], "attention_scaling": 1.0, **change}
    with pytest.raises(ProfileError, match=named) as err:
        Profiles.from_config(entry)
    assert "\n" not in str(err.value)


def test_a_continuous_t_rule_export_has_no_profiles_and_says_why(tmp_path, capsys):
    model = make_model("llama")
    clex.apply(model, "clex", max_factor=2, t_rule="continuous")
    model.save_pretrained(tmp_path / "clex")
    assert main(["export", "--model", str(tmp_path / "clex"), "--factor", "2", "--out", str(tmp_path / "x")]) == 0
    assert CONFIG_KEY not in json.loads((tmp_path / "x" / "config.json").read_text())
    assert "no per-request t for it: the model's CLEX t_rule is 'continuous'" in capsys.readouterr().out


def test_export_prints_the_serve_command(exported, tmp_path, capsys):
    _, root = exported
    assert main(["export", "--model", str(root / "clex"), "--factor", "2", "--out", str(tmp_path / "x")]) == 0
    assert f"vllm serve {tmp_path / 'x'} --max-model-len {2 * L}" in capsys.readouterr().out


def test_the_plugin_imports_only_vllm_torch_numpy_and_the_standard_library():
    import sys

    allowed = {"vllm", "torch", "numpy", *sys.stdlib_module_names}
    package = Path(clex.__file__).resolve().parents[1] / "clex_vllm"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def _runner(profiles: Profiles, rows: list[tuple[str, int, int, int]]):
    """A stand-in for vLLM's first model runner at one step: (request id, its t, tokens computed, tokens now)."""
    from types import SimpleNamespace as NS

    import numpy as np

    physical = torch.cat([torch.arange(done, done + now) for _, _, done, now in rows])
    runner = NS(
        model_config=NS(hf_config=NS(**{CONFIG_KEY: profiles.to_config()})),
        input_batch=NS(req_ids=[r for r, *_ in rows], num_computed_tokens_cpu=np.array([d for _, _, d, _ in rows])),
        requests={r: NS(sampling_params=NS(extra_args={"clex_t": t})) for r, t, _, _ in rows},
    )
    scheduled = NS(num_scheduled_tokens={r: now for r, _, _, now in rows}, total_num_scheduled_tokens=len(physical))
    padded = torch.cat([physical, torch.zeros(3, dtype=physical.dtype)])  # vLLM pads the step; padding stays 0
    return runner, scheduled, physical, padded


def test_the_runner_hook_moves_each_token_to_its_requests_table():
    from clex_vllm.plugin import _offset_positions

    p = Profiles(L=L, T=T, inv_freq=((1.0,),) * T)
    rows = [("a", 1, 0, 5), ("b", 3, 2 * L + 1, 1), ("c", 2, 7, 9), ("d", 4, 0, 2)]  # prefill, decode, chunks
    runner, scheduled, physical, padded = _runner(p, rows)
    out = _offset_positions(runner, (None, None, padded), scheduled, len(padded))
    assert out[2] is padded  # moved in place: the buffer the model reads
    want = torch.cat([physical[:5], physical[5:6] + offset(3, L), physical[6:15] + offset(2, L),
                      physical[15:] + offset(4, L), torch.zeros(3, dtype=physical.dtype)])
    assert torch.equal(padded, want)
    table = p.cos_sin_table()
    assert int(padded.max()) < len(table)


def test_the_runner_hook_refuses_a_position_beyond_the_requests_profile_and_a_request_without_one():
    from clex_vllm.plugin import _offset_positions

    p = Profiles(L=L, T=T, inv_freq=((1.0,),) * T)
    runner, scheduled, _, padded = _runner(p, [("a", 1, L - 1, 2)])  # positions L−1, L at t = 1
    with pytest.raises(RuntimeError, match=r"request a reached position 16, beyond its profile t = 1"):
        _offset_positions(runner, (None, None, padded), scheduled, len(padded))
    runner, scheduled, _, padded = _runner(p, [("a", 1, 0, 2)])
    runner.requests["a"].sampling_params.extra_args = {}
    with pytest.raises(RuntimeError, match="without a CLEX profile"):
        _offset_positions(runner, (None, None, padded), scheduled, len(padded))


def test_the_runner_hook_leaves_a_model_without_profiles_alone():
    from types import SimpleNamespace as NS

    from clex_vllm.plugin import _offset_positions

    positions = torch.arange(6)
    runner = NS(model_config=NS(hf_config=NS()))
    assert _offset_positions(runner, (None, None, positions), None, 6)[2] is positions
    assert torch.equal(positions, torch.arange(6))


def _engine_config(**change):
    from types import SimpleNamespace as NS

    p = Profiles(L=L, T=T, inv_freq=((1.0,),) * T)
    model = NS(hf_config=NS(**{CONFIG_KEY: p.to_config()}), max_model_len=T * L, uses_mrope=False,
               hf_text_config=NS(rope_parameters={"rope_type": "longrope"}))
    config = NS(model_config=model, speculative_config=None, kv_transfer_config=None, use_v2_model_runner=False)
    for key, value in change.items():
        setattr(model if hasattr(model, key) else config, key, value)
    return config


@pytest.mark.parametrize(
    ("change", "named"),
    [({"max_model_len": T * L + 1}, "--max-model-len 65 exceeds the 4·16 = 64 tokens"),
     ({"speculative_config": object()}, "speculative decoding"), ({"kv_transfer_config": object()}, "KV transfer"),
     ({"use_v2_model_runner": True}, "VLLM_USE_V2_MODEL_RUNNER=0"), ({"uses_mrope": True}, "multimodal rope")],
)
def test_the_engine_config_refuses_in_one_line_what_the_plugin_cannot_keep_right(change, named):
    from clex_vllm.plugin import _after_config

    config = _engine_config()
    assert _after_config(None, config) is config  # T·L, nothing else: served
    with pytest.raises(ProfileError, match=named) as err:
        _after_config(None, _engine_config(**change))
    assert "\n" not in str(err.value)
