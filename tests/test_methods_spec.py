"""A method as written (``clex.methods.MethodSpec``): parsed and checked once, still the string it was written as;
how long a context each method is meant for (``Method.supported_length``, ``clex.models.supported_length``)."""

from __future__ import annotations

import math

import pytest

import clex
from clex.methods import METHODS, MethodSpec, split_methods
from clex.models import supported_length
from clex.rotary import CLEXConfig
from tiny import L, make_model


# --- MethodSpec -------------------------------------------------------------------------------------------
def test_a_spec_knows_its_name_and_typed_params():
    spec = MethodSpec("yarn:factor=8,beta_fast=32,attention_factor=1.5")
    assert spec.name == "yarn" and spec.method is METHODS["yarn"]
    assert spec.params == {"factor": 8, "beta_fast": 32, "attention_factor": 1.5}
    assert [type(v) for v in spec.params.values()] == [int, int, float]
    assert MethodSpec("clex:log_scale=true,t_rule=continuous").params == {"log_scale": True, "t_rule": "continuous"}
    assert MethodSpec("vanilla").params == {} and MethodSpec(" ntk:factor=2 ").name == "ntk"


def test_a_spec_is_the_string_it_was_written_as():
    text = "yarn:factor=8,beta_fast=32"
    spec = MethodSpec(text)
    assert isinstance(spec, str) and spec == text and str(spec) == text
    assert hash(spec) == hash(text)
    assert {text: 1}[spec] == 1 and {spec: 2}[text] == 2  # results keyed by either find the other
    assert spec != "yarn:beta_fast=32,factor=8"  # the same method written otherwise is another string


def test_a_spec_is_not_parsed_twice():
    spec = MethodSpec("pi:factor=2")
    assert MethodSpec(spec) is spec


@pytest.mark.parametrize(("text", "message"), [
    ("warp", "unknown method 'warp'"),
    ("warp:factor=2", "unknown method 'warp'"),
    ("yarn:factor=8,gamma=2", r"unknown parameter\(s\) \['gamma'\] for method 'yarn'"),
    ("vanilla:factor=2", r"unknown parameter\(s\) \['factor'\] for method 'vanilla'"),
    ("pi", r"method 'pi' needs parameter\(s\) \['factor'\]"),
    ("yarn:beta_fast=32", r"method 'yarn' needs parameter\(s\) \['factor'\]"),
    ("longrope:short_factor=1", "needs parameter"),
    ("pi:factor=0.5", "factor for method 'pi' must be a number in 1"),
    ("ntk:factor=2000", "factor for method 'ntk' must be a number in 1"),
    ("pi:factor", "must look like key=value"),
    ("pi:factor=2,factor=3", "given twice"),
    ("clex:max_factor=2.5", "max_factor must be an integer in 1 … 1024"),
    ("clex:act=relu6", "act must be one of"),
    ("clex:t_rule=sometimes", "t_rule must be one of"),
    ("clex:time_dt=2", r"time_dt must be a number in \(0, 1\]"),
    ("clex:param_factor=0", "param_factor must be an integer >= 1"),
    ("clex:log_scale=yes", "log_scale must be a bool"),
    ("clex:t_rule=ceil,policy=continuous", "both given and differ"),
    ("clex:original_max_position_embeddings=0", "must be a positive integer"),
])
def test_a_bad_spec_is_refused_at_construction(text, message):
    with pytest.raises(ValueError, match=message):
        MethodSpec(text)


def test_every_clex_setting_is_accepted_by_name():
    """A spec may set any CLEX setting by its name (and ``policy``, the older name of ``t_rule``)."""
    spec = MethodSpec("clex:max_factor=8,param_factor=2,act=tanh,time_dt=0.1,t_rule=continuous,log_scale=false,"
                      "clamp=true,ode_base=500000")
    assert spec.params["max_factor"] == 8 and spec.params["ode_base"] == 500000
    assert MethodSpec("clex:policy=continuous").params == {"policy": "continuous"}
    named = {f for f in CLEXConfig.__dataclass_fields__ if f != "original_max_position_embeddings"}
    assert named <= set(METHODS["clex"].optional)


def test_split_methods_keeps_parameters_with_their_method():
    specs = split_methods("vanilla,yarn:factor=8,beta_fast=32,clex")
    assert specs == ["vanilla", "yarn:factor=8,beta_fast=32", "clex"]
    assert all(isinstance(s, MethodSpec) for s in specs)
    assert [s.name for s in specs] == ["vanilla", "yarn", "clex"]
    assert specs[1].params == {"factor": 8, "beta_fast": 32}
    assert split_methods(" pi:factor=2 , ntk:factor=4,, ") == ["pi:factor=2", "ntk:factor=4"]
    with pytest.raises(ValueError, match="starts with a parameter"):
        split_methods("factor=2,pi")
    with pytest.raises(ValueError, match="unknown method"):
        split_methods("vanilla,warp")


# --- supported length -------------------------------------------------------------------------------------
@pytest.mark.parametrize("L0", [16, 100])
def test_supported_length_of_every_method(L0):
    expected = {
        "vanilla": L0,
        "pi:factor=2": 2 * L0,
        "ntk:factor=3": 3 * L0,
        "dynamic:factor=2.5": math.ceil(2.5 * L0),
        "yarn:factor=4,beta_fast=32": 4 * L0,
        "llama3:factor=1.3": math.ceil(1.3 * L0),
        "clex:max_factor=8": 8 * L0,
        "clex": 16 * L0,  # CLEX's default max_factor
    }
    for text, length in expected.items():
        spec = MethodSpec(text)
        assert spec.supported_length(L0) == length, text
        assert spec.method.supported_length(spec.params, L0) == length, text
    assert CLEXConfig.__dataclass_fields__["max_factor"].default == 16
    longrope = METHODS["longrope"]  # its factors are lists, which a spec string cannot write
    assert longrope.supported_length({"long_factor": [2.0], "short_factor": [1.0]}, L0) == L0
    assert longrope.supported_length({"factor": 2.5, "long_factor": [2.0], "short_factor": [1.0]}, L0) == \
        math.ceil(2.5 * L0)


def test_a_clex_models_own_max_factor_is_its_supported_length():
    model = make_model("llama")
    assert supported_length(model, "clex") == 16 * L  # a plain model: CLEX's default max_factor
    assert supported_length(model, "yarn:factor=2") == 2 * L
    clex.apply(model, "clex", max_factor=4)
    assert supported_length(model, "clex") == 4 * L  # the bare spec keeps the model's own max_factor
    assert supported_length(model, "vanilla") == L
    assert supported_length(model, "pi:factor=3") == 3 * L


def test_an_explicit_max_factor_on_a_clex_model_is_the_specs():
    model = make_model("llama")
    clex.apply(model, "clex", max_factor=4)
    answer = supported_length(model, "clex:max_factor=8")
    clex.apply(model, "clex:max_factor=8")
    assert clex.clex_modules(model)[0].settings.max_factor == 8
    assert answer == supported_length(model, "clex") == 8 * L
