"""The CLEX rotary embedding: a drop-in for a model's own rotary module.

It returns ``(cos, sin)`` exactly as the module it replaces does (shape, dtype, partial rotary
width, ``attention_scaling``), with frequencies ``θ(t)`` from the CLEX ODE:

* inference — ``t`` from the current length ``n = max(position_ids) + 1`` and the training length
  ``L``: ``ceil(n / L)`` (the reference) or ``n / L`` (``continuous``), clamped to ``[1, max_factor]``.
  The integer grid ``θ(1) … θ(max_factor)`` is solved once and cached until the parameters change.
* training — ``position_ids`` from :func:`extrapolated_positions` end at ``L·t' − 1``, so the same
  rule gives back ``t = t'``; with gradients enabled the ODE is solved from 1 to ``t'`` on the fly.

At ``t = 1`` the frequencies are the original module's buffer itself: for ``n ≤ L`` a CLEX model
computes exactly what the unmodified model does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .dynamics import CLEXDynamics, validate_dynamics

POLICIES = ("ceil", "continuous")
LAYOUTS = ("scatter", "chunks")
T_SAMPLINGS = ("uniform", "log")
# The largest scaling factor any method accepts (factor, CLEX's max_factor). Solving CLEX's grid θ(1) … θ(T)
# costs about 1 ms per unit of T on one CPU core (1 s at 1024, measured; 1e9 ran out of memory), and a
# factor of 1024 already means 1024·L tokens of context.
MAX_FACTOR = 1024


@dataclass(frozen=True)
class CLEXConfig:
    """CLEX's settings; stored in ``config.rope_parameters`` with ``rope_type = "clex"``."""

    original_max_position_embeddings: int  # L: the length the frequencies θ were trained for
    max_factor: int = 16
    param_factor: int = 1
    act: str = "tanh"
    time_dt: float = 0.2  # RK4 step of our residual-form solver (the reference's 0.01 agrees to <1e-6)
    ode_base: float = 10000.0  # base of θ_ntk inside the field; the reference always uses 10000
    policy: str = "ceil"
    log_scale: bool = False  # the reference's query scaling by ln(n)/ln(L)
    clamp: bool = True  # beyond max_factor·L: warn and keep θ(max_factor); False raises

    def __post_init__(self) -> None:
        L = self.original_max_position_embeddings
        if not isinstance(L, int) or isinstance(L, bool) or L < 1:
            raise ValueError(f"original_max_position_embeddings must be a positive integer, got {L!r}")
        mf = self.max_factor
        if not isinstance(mf, int) or isinstance(mf, bool) or not 1 <= mf <= MAX_FACTOR:
            raise ValueError(f"max_factor must be an integer in 1 … {MAX_FACTOR}, got {mf!r}")
        validate_dynamics(4, self.param_factor, self.act, self.ode_base, self.time_dt)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("log_scale", "clamp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    # Keys of the reference's rope_scaling that carry no information for us.
    # (``scaled_from``: the rope the model shipped with, which CLEX starts from; see ``clex.composed``.)
    IGNORED_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "scaled_from"})

    @classmethod
    def from_rope_parameters(cls, params: dict, default_length: int) -> CLEXConfig:
        """Build from a ``rope_parameters`` dict (ours or the reference's ``rope_scaling``)."""
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known - cls.IGNORED_KEYS
        if unknown:
            raise ValueError(f"unknown CLEX parameter(s) {sorted(unknown)}; expected some of {sorted(known)}")
        kwargs = {k: v for k, v in params.items() if k in known}
        kwargs.setdefault("original_max_position_embeddings", default_length)
        if isinstance(kwargs.get("time_dt"), int) and not isinstance(kwargs.get("time_dt"), bool):
            kwargs["time_dt"] = float(kwargs["time_dt"])
        if isinstance(kwargs.get("ode_base"), int) and not isinstance(kwargs.get("ode_base"), bool):
            kwargs["ode_base"] = float(kwargs["ode_base"])
        return cls(**kwargs)

    def to_rope_parameters(self) -> dict:
        return {"rope_type": "clex", **asdict(self)}


class ClexRotary(nn.Module):
    """Wraps a model's rotary module (``original``) and replaces its frequencies with CLEX's.

    ``original`` still supplies θ (its ``inv_freq`` buffer), ``attention_scaling`` and, for models
    with several rope layer types (Gemma 3), the rope of the types CLEX does not touch.
    The class name deliberately avoids "RotaryEmbedding": transformers re-initialises modules so named.
    """

    def __init__(self, original: nn.Module, config: CLEXConfig, layer_type: str | None = None) -> None:
        super().__init__()
        self.original = original
        self.layer_type = layer_type
        self.settings = config
        rotary_dim = 2 * self._base_inv_freq().numel()
        self.clex_ode = CLEXDynamics(rotary_dim, config.param_factor, config.act, config.ode_base, config.time_dt)
        self._grid: torch.Tensor | None = None
        self._grid_key: tuple = ()
        self._continuous_memo: tuple | None = None
        self._warned = False
        self._decode_warned: set[str] = set()
        # generation (clex.cache): the KV-cache policy, a fixed t, and state of the recompute policy
        self.policy = "rerotate"
        self.t_override: float | None = None
        self._recorded_ids: torch.Tensor | None = None
        self._in_recompute = False
        # θ in fp32 as last seen before a cast: model.to(torch.bfloat16) rounds the wrapped module's inv_freq
        # (θ moves by ~4e-3), but CLEX's path starts from the exact θ. A plain attribute, which .to(dtype)
        # leaves alone; _apply moves it between devices.
        self._exact_theta: torch.Tensor | None = None
        # a ``longrope`` base (Phi-3 long): below its original length L0 the model as shipped uses the short set
        self._short_below = 0
        self._short_source = None
        self._short_theta: torch.Tensor | None = None

    def keep_short_set(self, below: int, source) -> None:
        """At t = 1 and lengths n ≤ ``below``, use ``source(device)`` (a base rope's short factor set) as θ."""
        self._short_below, self._short_source, self._short_theta = below, source, None

    def _short_set(self, device) -> torch.Tensor:
        raw = self._inv_freq_buffer()
        theta = self._short_theta
        if theta is None or theta.device != raw.device:
            # rounded as the shipped model's own buffer is (bf16 after model.to(bfloat16))
            theta = self._short_theta = self._short_source(raw.device).to(raw.dtype).float()
        return theta.to(device)

    # --- what the wrapped module knows -------------------------------------------------------
    @property
    def config(self):
        """The model's config, as the wrapped module holds it (some families read ``rotary_emb.config``);
        CLEX's own settings are :attr:`settings`."""
        return self.original.config

    @config.setter
    def config(self, value) -> None:
        self.original.config = value

    def _inv_freq_buffer(self) -> torch.Tensor:
        name = "inv_freq" if self.layer_type is None else f"{self.layer_type}_inv_freq"
        return getattr(self.original, name)

    def _base_inv_freq(self) -> torch.Tensor:
        """θ: the wrapped module's buffer, or its exact fp32 values when ``model.to(dtype)`` has rounded it."""
        raw = self._inv_freq_buffer()
        if raw.dtype in (torch.float32, torch.float64):
            return raw
        exact = self._exact_theta
        if exact is not None and exact.shape == raw.shape and torch.equal(exact.to(raw.device, raw.dtype), raw):
            if exact.device != raw.device:
                exact = self._exact_theta = exact.to(raw.device)
            return exact
        return raw.float()

    def _apply(self, fn, recurse=True):
        raw = self._inv_freq_buffer()
        if raw.dtype in (torch.float32, torch.float64) and raw.device.type != "meta":
            self._exact_theta = raw.detach().float().clone()
        super()._apply(fn, recurse)
        if self._exact_theta is not None:
            self._exact_theta = self._exact_theta.to(self._inv_freq_buffer().device)
        return self

    def _attention_scaling(self) -> float:
        name = "attention_scaling" if self.layer_type is None else f"{self.layer_type}_attention_scaling"
        return float(getattr(self.original, name, 1.0))

    @property
    def rotary_dim(self) -> int:
        return self.clex_ode.rotary_dim

    # --- t and θ(t) -----------------------------------------------------------------------------
    def scaling_factor(self, n: int) -> float:
        """t for a sequence of current length ``n`` under the configured policy, clamped."""
        cfg = self.settings
        L = cfg.original_max_position_embeddings
        t = float(math.ceil(n / L)) if cfg.policy == "ceil" else n / L
        if t > cfg.max_factor:
            msg = (
                f"sequence length {n} exceeds CLEX's max_factor·L = {cfg.max_factor}·{L}; "
                f"frequencies stay at t = {cfg.max_factor}"
            )
            if not cfg.clamp:
                raise ValueError(f"refused: sequence length {n} exceeds CLEX's max_factor·L = {cfg.max_factor}·{L} "
                                 "and clamp=False; use a shorter input, a larger max_factor, or clamp=True (keeps "
                                 f"t = {cfg.max_factor} beyond it)")  # fmt: skip
            if not self._warned:
                warnings.warn(msg, stacklevel=3)
                self._warned = True
            t = float(cfg.max_factor)
        return max(1.0, t)

    def trajectory(self) -> torch.Tensor:
        """``θ(1) … θ(max_factor)`` (fp32, one row per integer t), cached until the parameters change."""
        ode = self.clex_ode
        # Compare values, not version counters: writes through ``.data`` (some optimizers, weight
        # loading) do not bump ``_version``. d²·k numbers: negligible next to a forward.
        state = (ode.up_proj.detach(), ode.down_proj.detach(), self._base_inv_freq())
        if self._grid is None or not all(
            a.shape == b.shape and a.device == b.device and torch.equal(a, b)
            for a, b in zip(state, self._grid_key, strict=True)
        ):
            self._check_finite()
            with torch.no_grad():
                grid = range(1, self.settings.max_factor + 1)
                self._grid = torch.exp(ode.solve(self._log_theta(), grid, self._ode_dtype())).float()
            self._grid_key = tuple(x.clone() for x in state)
        return self._grid

    def frequencies(self, t: float) -> torch.Tensor:
        """θ(t) in fp32; differentiable in the CLEX parameters when gradients are enabled."""
        if t <= 1.0:  # the wrapped module's own θ (as the unmodified model computes, rounded or not)
            return self._inv_freq_buffer().float()
        needs_grad = torch.is_grad_enabled() and (
            self.clex_ode.up_proj.requires_grad or self.clex_ode.down_proj.requires_grad
        )
        if needs_grad:
            self._check_finite()
            return torch.exp(self.clex_ode.solve(self._log_theta(), [t], self._ode_dtype())[0]).float()
        grid = self.trajectory()
        if t == int(t):
            return grid[int(t) - 1]
        # continuous t: continue from the grid point below (the residual field needs no restart);
        # the last value is kept, so the layers and repeated forwards at one t solve once
        memo = self._continuous_memo
        if memo is not None and memo[0] == t and memo[1] is grid:
            return memo[2]
        start = math.floor(t)
        with torch.no_grad():
            log_start = torch.log(grid[start - 1].to(self._ode_dtype()))
            value = torch.exp(self.clex_ode.solve(log_start, [t], self._ode_dtype(), start=start)[0]).float()
        self._continuous_memo = (t, grid, value)
        return value

    def _log_theta(self) -> torch.Tensor:
        return torch.log(self._base_inv_freq().to(self._ode_dtype()))

    def _ode_dtype(self) -> torch.dtype:
        return torch.float32 if self._base_inv_freq().device.type == "mps" else torch.float64

    def _check_finite(self) -> None:
        if not self.clex_ode.parameters_finite():
            raise ValueError("CLEX parameters (clex_ode.up_proj / down_proj) contain NaN or inf")

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        if layer_type is not None and layer_type != self.layer_type:
            return self.original(x, position_ids, layer_type)
        first, last = (int(v) for v in torch.aminmax(position_ids))
        n = last + 1
        t = self.t_override if self.t_override is not None else self.scaling_factor(n)
        if first > 0 and self.settings.log_scale:  # continuing from a KV cache
            self._warn_log_scale_with_cache()
        if t <= 1.0 and n <= self._short_below:
            inv_freq = self._short_set(x.device)
        else:
            inv_freq = self.frequencies(t).to(x.device)
        with torch.autocast(x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            scale = self._attention_scaling()
            if self.settings.log_scale:
                # Scaling cos and sin by √s scales every q·k by s: the reference's queries × ln n / ln L.
                L = self.settings.original_max_position_embeddings
                scale *= math.sqrt(math.log(n) / math.log(L)) if L > 1 else 1.0
            cos, sin = emb.cos(), emb.sin()
            if scale != 1.0:
                cos, sin = cos * scale, sin * scale
        return cos.to(x.dtype), sin.to(x.dtype)

    def _warn_log_scale_with_cache(self) -> None:
        if "log_scale" not in self._decode_warned:
            self._decode_warned.add("log_scale")
            warnings.warn(
                "log_scale with a KV cache: cached keys keep the √(ln n/ln L) of the step that wrote them, "
                "so attention logits differ from a full forward (exact only without a cache).",
                stacklevel=3,
            )


def clex_modules(model: nn.Module) -> list[ClexRotary]:
    """The CLEX rotary modules of ``model`` (empty if it does not use CLEX)."""
    return [m for m in model.modules() if isinstance(m, ClexRotary)]


# --- training-time sampling ------------------------------------------------------------------------
def sample_scale_factor(max_factor: int, generator: torch.Generator | None = None, sampling: str = "uniform") -> int:
    """The training step's t' in the integers 1 … max_factor (1 included, as the reference).

    ``uniform`` (the reference): each equally likely. ``log`` (ours, an option of the reproduction
    study): P(t') ∝ 1/t', i.e. even mass per octave of length, so short contexts (t' = 1 about 30%
    of the steps at max_factor 16) keep more of the budget.
    """
    if not isinstance(max_factor, int) or max_factor < 1:
        raise ValueError(f"max_factor must be an integer >= 1, got {max_factor!r}")
    if sampling == "uniform":
        return int(torch.randint(1, max_factor + 1, (1,), generator=generator).item())
    if sampling == "log":
        weights = 1.0 / torch.arange(1, max_factor + 1, dtype=torch.float64)
        return int(torch.multinomial(weights, 1, generator=generator).item()) + 1
    raise ValueError(f"t' sampling must be one of {T_SAMPLINGS}, got {sampling!r}")


def extrapolated_positions(
    length: int,
    t: int,
    generator: torch.Generator | None = None,
    layout: str = "scatter",
    chunks: int = 2,
    base_length: int | None = None,
) -> torch.Tensor:
    """Position ids for ``length`` training tokens that make the model see distances up to ``L·t``
    (README, "Fine-tuning"), where ``L = base_length`` (default: ``length``).

    First 0, last ``L·t − 1``, strictly increasing, so the CLEX rotary module infers exactly ``t``.
    ``scatter`` (the reference): ``length − 2`` inner positions drawn at random without replacement
    from ``1 … length·t − 2``. ``chunks``: ``chunks`` contiguous runs of random lengths with random
    skips between them (PoSE-like), which keeps short offsets exact.

    Training longer than the base context (``length = k·L``, the reference's long regime): the
    positions are scaled by ``(L·t − 1)/(length·t − 1) ≈ 1/k`` (fractional ids), so ``t = 1`` is
    position interpolation by k and ``t = k`` is nearly contiguous ``0 … length − 1``. Unlike the
    reference's ``/k``, the last position stays above the one before it.

    Pass an explicit all-ones ``attention_mask`` with these ids: without one, transformers reads
    gaps in ``position_ids`` as boundaries of packed sequences and blocks attention across them.
    """
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer >= 2, got {length!r}")
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"t must be an integer >= 1, got {t!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if base_length is not None and (not isinstance(base_length, int) or base_length < 1):
        raise ValueError(f"base_length must be a positive integer, got {base_length!r}")
    raw = _raw_positions(length, t, generator, layout, chunks)
    L = base_length or length
    if L == length:
        return raw
    return raw.double().mul_((L * t - 1) / (length * t - 1)).float()


def _raw_positions(length: int, t: int, generator, layout: str, chunks: int) -> torch.Tensor:
    """``length`` integer positions in ``0 … length·t − 1``, first and last included."""
    span = length * t
    if t == 1:
        return torch.arange(length)
    if layout == "scatter":
        inner = torch.randperm(span - 2, generator=generator)[: length - 2].sort().values + 1
        return torch.cat([torch.tensor([0]), inner, torch.tensor([span - 1])])
    if not isinstance(chunks, int) or chunks < 2 or chunks > length:
        raise ValueError(f"chunks must be an integer in [2, length] (one run cannot reach length·t), got {chunks!r}")
    # Random run lengths (each >= 1) and random skips between runs; the first run starts at 0 and
    # the last ends at span - 1, so all span - length unused positions fall between runs.
    size_cuts = (torch.randperm(length - 1, generator=generator)[: chunks - 1] + 1).sort().values
    size_bounds = [0, *size_cuts.tolist(), length]
    skip_total = span - length
    skip_cuts = torch.randint(0, skip_total + 1, (chunks - 2,), generator=generator).sort().values.tolist()
    skip_bounds = [0, *skip_cuts, skip_total]
    out, pos = [], 0
    for i in range(chunks):
        if i > 0:
            pos += skip_bounds[i] - skip_bounds[i - 1]
        size = size_bounds[i + 1] - size_bounds[i]
        out.append(torch.arange(pos, pos + size))
        pos += size
    return torch.cat(out)


def sample_training_positions(
    length: int,
    max_factor: int,
    generator: torch.Generator | None = None,
    layout: str = "scatter",
    chunks: int = 2,
    base_length: int | None = None,
    sampling: str = "uniform",
) -> tuple[int, torch.Tensor]:
    """One CLEX training step's ``(t', position_ids)``: t' in 1 … max_factor (``sampling``, see
    :func:`sample_scale_factor`), then ``length`` positions spanning ``0 … L·t' − 1`` (``L =
    base_length``, the model's CLEX training length; default ``length``). Feeding these ids (with an
    all-ones attention mask) makes the CLEX rotary module solve the ODE to exactly t' with gradients."""
    t = sample_scale_factor(max_factor, generator, sampling)
    return t, extrapolated_positions(length, t, generator, layout, chunks, base_length)
