"""One registry of position-scaling methods.

Each method says how a model uses it, as the ``rope_parameters`` dict it writes into the model's
config. Stock methods then run on transformers' own rope-init functions (``ROPE_INIT_FUNCTIONS``);
this module adds the two that transformers lacks to that same table — static ``ntk`` and ``clex`` —
with validation beside them, so a saved config round-trips through plain transformers after
``import clex``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import modeling_rope_utils as mru

from clex.rotary import MAX_FACTOR, CLEXConfig, renamed_settings


@dataclass(frozen=True)
class Method:
    """A position-scaling method: which rope type it writes and which parameters it takes."""

    name: str
    rope_type: str
    summary: str
    required: tuple[str, ...] = ()
    optional: dict = field(default_factory=dict)  # name -> default (None: transformers' default)
    # Whether transformers reads the pre-extension length from the config's max_position_embeddings
    # (dynamic) or from rope_parameters["original_max_position_embeddings"] (the others that need it).
    length_key: str | None = None

    def supported_length(self, params: dict, L: int) -> int:
        """The one answer to "how long a context is this method meant for", from training length ``L``:
        CLEX max_factor · L, a fixed-factor method ⌈factor · L⌉, plain RoPE (and LongRoPE without a factor) L."""
        if self.name == "clex":
            return int(params.get("max_factor") or _CLEX_DEFAULTS["max_factor"]) * L
        return _factor_length(params, L) if params.get("factor") else L

    def advertised_length(self, params: dict, L: int) -> int:
        """The ``max_position_embeddings`` a model with this method says: its supported length where
        transformers reads L from ``original_max_position_embeddings``; L where it reads L from
        ``max_position_embeddings`` itself (dynamic) or reads no length at all (pi, ntk, vanilla)."""
        return self.supported_length(params, L) if self.length_key == "original_max_position_embeddings" else L

    def rope_parameters(self, params: dict, L: int, rope_theta: float) -> dict:
        """The ``rope_parameters`` dict for this method with ``params`` at training length ``L``."""
        params = renamed_settings(params) if self.name == "clex" else params
        unknown = set(params) - set(self.required) - set(self.optional)
        if unknown:
            allowed = sorted(set(self.required) | set(self.optional)) or "none"
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for method {self.name!r}; allowed: {allowed}")
        missing = [p for p in self.required if p not in params]
        if missing:
            raise ValueError(f"method {self.name!r} needs parameter(s) {missing}, e.g. {self.name}:factor=8")
        out = {"rope_type": self.rope_type, "rope_theta": rope_theta}
        for key, default in self.optional.items():
            if default is not None:
                out[key] = default
        out.update(params)
        if self.length_key == "original_max_position_embeddings":
            out["original_max_position_embeddings"] = L
        _check_factor(self.name, out)
        return out


def _check_factor(name: str, params: dict) -> None:
    if "factor" in params:
        f = params["factor"]
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not math.isfinite(f) or not 1 <= f <= MAX_FACTOR:
            raise ValueError(f"factor for method {name!r} must be a number in 1 … {MAX_FACTOR}, got {f!r}")
    for key in ("long_factor", "short_factor"):
        if key in params:
            v = params[key]
            if not isinstance(v, (list, tuple)) or not all(
                isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in v
            ):
                raise ValueError(f"{key} for method {name!r} must be a list of positive finite numbers")
            params[key] = [float(x) for x in v]


def _factor_length(params: dict, L: int) -> int:
    return int(math.ceil(params["factor"] * L))


_CLEX_DEFAULTS = {
    f: CLEXConfig.__dataclass_fields__[f].default
    for f in ("max_factor", "param_factor", "act", "time_dt", "t_rule", "log_scale", "clamp")
}

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("vanilla", "default", "plain RoPE, unchanged frequencies"),
        Method("pi", "linear", "position interpolation: θ_j / factor", ("factor",)),
        Method("ntk", "ntk", "static NTK-aware: base · factor^(d/(d−2))", ("factor",)),
        Method(
            "dynamic",
            "dynamic",
            "dynamic NTK: α recomputed from the current length",
            ("factor",),
            length_key="max_position_embeddings",
        ),
        Method(
            "yarn",
            "yarn",
            "YaRN: per-pair ramp between θ and θ/factor, attention temperature 0.1·ln(factor) + 1",
            ("factor",),
            {
                "beta_fast": None,
                "beta_slow": None,
                "attention_factor": None,
                "mscale": None,
                "mscale_all_dim": None,
                "truncate": None,
            },
            length_key="original_max_position_embeddings",
        ),
        Method(
            "longrope",
            "longrope",
            "LongRoPE: per-pair searched rescale factors (long_factor beyond L, short_factor within)",
            ("long_factor", "short_factor"),
            # short_mscale / long_mscale: what vLLM and Phi-MoE read in place of attention_factor
            {"factor": None, "attention_factor": None, "short_mscale": None, "long_mscale": None},
            length_key="original_max_position_embeddings",
        ),
        Method(
            "llama3",
            "llama3",
            "Llama 3.1: wavelength-banded interpolation",
            ("factor",),
            {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
            length_key="original_max_position_embeddings",
        ),
        Method(
            "clex",
            "clex",
            "CLEX: frequencies θ(t) learned as a neural ODE in the scaling factor t",
            (),
            {**_CLEX_DEFAULTS, "ode_base": None},
            length_key="original_max_position_embeddings",
        ),
    ]
}


def available_methods() -> list[str]:
    """Names accepted by ``clex.apply`` and ``methods``."""
    return list(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def parse_method(spec: str) -> tuple[str, dict]:
    """``"yarn:factor=8,beta_fast=32"`` → ``("yarn", {"factor": 8, "beta_fast": 32})`` (the syntax only; a
    :class:`MethodSpec` also checks the parameters). A ``MethodSpec`` is not parsed again."""
    if isinstance(spec, MethodSpec):
        return spec.name, dict(spec.params)
    name, _, rest = spec.strip().partition(":")
    get_method(name)
    params: dict = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method parameter {item!r} in {spec!r} must look like key=value")
        key = key.strip()
        if key in params:
            raise ValueError(f"method parameter {key!r} is given twice in {spec!r}; give it once")
        params[key] = _parse_value(value.strip())
    return name, params


class MethodSpec(str):
    """A method as written (``"yarn:factor=8"``), parsed and checked once: it knows its ``name``, its
    ``params`` and its :meth:`supported_length`, and is still the string it was written as (results are keyed
    by it). Every check that needs no model runs here (unknown or missing parameters, the range of ``factor``
    and ``max_factor``, CLEX's settings), so a bad method is refused before any work."""

    name: str
    params: dict

    def __new__(cls, spec: str) -> MethodSpec:
        if isinstance(spec, MethodSpec):
            return spec
        self = super().__new__(cls, spec)
        self.name, self.params = parse_method(spec)
        params = dict(self.params)
        L = params.pop("original_max_position_embeddings", 2)
        if not isinstance(L, int) or isinstance(L, bool) or L < 1:
            raise ValueError(f"original_max_position_embeddings in {spec!r} must be a positive integer, got {L!r}")
        rope = self.method.rope_parameters(params, L, 10000.0)
        if self.name == "clex":
            try:
                CLEXConfig.from_rope_parameters({k: v for k, v in rope.items() if v is not None}, L)
            except ValueError as err:
                raise ValueError(f"method {spec!r}: {err}") from None
        return self

    @property
    def method(self) -> Method:
        return METHODS[self.name]

    def supported_length(self, L: int) -> int:
        """How long a context this method is meant for, from training length ``L`` (see ``Method``)."""
        return self.method.supported_length(self.params, L)


def check_method(spec: str) -> tuple[str, dict]:
    """``(name, params)`` of a checked :class:`MethodSpec`."""
    checked = MethodSpec(spec)
    return checked.name, dict(checked.params)


BASE_LENGTH_HELP = ("the length L the model was trained at, which every method extends from (default: the model's "
                    "context: max_position_embeddings, or factor × original length where its rope is already "
                    "scaled); reports and plots count lengths in it")


def declare_length(spec: str, base_length: int | None) -> str:
    """``spec`` with the training length L declared (``base_length``): the spec parameter
    ``original_max_position_embeddings``, which ``clex.apply`` also takes as a keyword. A spec that already
    declares another L is refused."""
    if base_length is None:
        return spec
    if isinstance(base_length, bool) or not isinstance(base_length, int) or base_length < 1:
        raise ValueError(f"`base_length` must be a positive integer (tokens), got {base_length!r}")
    name, params = parse_method(spec)
    given = params.get("original_max_position_embeddings")
    if given is not None and given != base_length:
        raise ValueError(f"L given twice: original_max_position_embeddings={given} in {spec!r} and `base_length` "
                         f"{base_length} (base_length); give it once")
    if given is not None:
        return spec
    return f"{spec}{',' if ':' in spec else ':'}original_max_position_embeddings={base_length}"


def split_methods(text: str) -> list[MethodSpec]:
    """``"vanilla,yarn:factor=8,beta_fast=32,clex"`` → ``["vanilla", "yarn:factor=8,beta_fast=32", "clex"]``:
    a comma-separated item with ``=`` but no ``:`` is another parameter of the method before it."""
    specs: list[str] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "=" in item and ":" not in item:
            if not specs:
                raise ValueError(f"method list {text!r} starts with a parameter ({item!r}), not a method")
            specs[-1] += "," + item
        else:
            specs.append(item)
    return [MethodSpec(spec) for spec in specs]


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# --- the two rope types transformers lacks, registered into its own table ------------------------
def _rope_dims(config, layer_type: str | None) -> tuple[dict, float, int]:
    config.standardize_rope_params()
    params = config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return params, params["rope_theta"], dim


def plain_inv_freq(base: float, dim: int, device) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base**exponents)


def compute_ntk_parameters(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """Static NTK-aware scaling: θ_j with base · factor^(d/(d−2))."""
    params, base, dim = _rope_dims(config, layer_type)
    return plain_inv_freq(base * params["factor"] ** (dim / (dim - 2)), dim, device), 1.0


def compute_clex_parameters(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """θ at t = 1. The learned θ(t) lives in ``clex.rotary.CLEXRotary``, which wraps the model's
    rotary module built with these frequencies (``clex.models`` installs it on model init)."""
    _, base, dim = _rope_dims(config, layer_type)
    return plain_inv_freq(base, dim, device), 1.0


def _validate_ntk(self, rope_parameters: dict, ignore_keys=None) -> None:
    self._check_received_keys("ntk", set(rope_parameters), {"rope_type", "factor"}, {"rope_theta"}, ignore_keys)
    _check_factor("ntk", dict(rope_parameters))


def _validate_clex(self, rope_parameters: dict, ignore_keys=None) -> None:
    params = {k: v for k, v in rope_parameters.items() if k not in (ignore_keys or ())}
    CLEXConfig.from_rope_parameters(params, self.max_position_embeddings)


def register_with_transformers() -> None:
    """Add ``ntk`` and ``clex`` to transformers' rope table and config validation (idempotent)."""
    mru.ROPE_INIT_FUNCTIONS["ntk"] = compute_ntk_parameters
    mru.ROPE_INIT_FUNCTIONS["clex"] = compute_clex_parameters
    mru.RotaryEmbeddingConfigMixin._validate_ntk_rope_parameters = _validate_ntk
    mru.RotaryEmbeddingConfigMixin._validate_clex_rope_parameters = _validate_clex
