"""The CLEX rotary embedding: a drop-in for a model's own rotary module (docs/design.md §4–5).

It returns ``(cos, sin)`` exactly as the module it replaces does (shape, dtype, partial rotary
width, ``attention_scaling``), with frequencies ``θ(t)`` from the CLEX ODE:

* inference — ``t`` from the current length ``n`` and the training length ``L``: ``ceil(n / L)`` (the
  reference) or ``n / L`` (``continuous``), clamped to ``[1, max_factor]``. ``n`` is each sequence's own:
  1 + the largest attended position of its row (or of each sequence packed into a row), so every row of a
  padded batch computes what it computes alone (:meth:`CLEXRotary.token_factors`). The integer grid
  ``θ(1) … θ(max_factor)`` is solved once and cached until the parameters change.
* training — ``position_ids`` from :func:`extrapolated_positions` end at ``L·t' − 1``, and one ``t`` per step
  comes from the longest row, which gives back ``t = t'``; with gradients enabled the ODE is solved from 1 to
  ``t'`` on the fly.

At ``t = 1`` the frequencies are the original module's buffer itself: for ``n ≤ L`` a CLEX model
computes exactly what the unmodified model does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from clex.dynamics import CLEXDynamics, validate_dynamics
from clex.positions import (
    token_lengths,
)

T_RULES = ("ceil", "continuous")  # how t follows the length: ⌈n/L⌉ or n/L
# The largest scaling factor any method accepts (factor, CLEX's max_factor). Solving CLEX's grid θ(1) … θ(T)
# costs about 1 ms per unit of T on one CPU core (1 s at 1024, measured; 1e9 ran out of memory), and a
# factor of 1024 already means 1024·L tokens of context.
MAX_FACTOR = 1024


def renamed_settings(params: dict) -> dict:
    """``params`` with CLEX's ``policy`` (the older name of ``t_rule``) under its new name."""
    if "policy" not in params:
        return params
    params = dict(params)
    old = params.pop("policy")
    if params.setdefault("t_rule", old) != old:
        raise ValueError(f"t_rule {params['t_rule']!r} and its older name policy {old!r} are both given and differ")
    return params


@dataclass(frozen=True)
class CLEXConfig:
    """CLEX's settings; stored in ``config.rope_parameters`` with ``rope_type = "clex"``."""

    original_max_position_embeddings: int  # L: the length the frequencies θ were trained for
    max_factor: int = 16
    param_factor: int = 1
    act: str = "tanh"
    time_dt: float = 0.2  # RK4 step of our residual-form solver (the reference's 0.01 agrees to <1e-6)
    ode_base: float = 10000.0  # base of θ_ntk inside the field; the reference always uses 10000
    t_rule: str = "ceil"
    log_scale: bool = False  # the reference's query scaling by ln(n)/ln(L)
    clamp: bool = True  # beyond max_factor·L: warn and keep θ(max_factor); False raises

    def __post_init__(self) -> None:
        L = self.original_max_position_embeddings
        if not isinstance(L, int) or isinstance(L, bool) or L < 1:
            raise ValueError(f"original_max_position_embeddings must be a positive integer, got {L!r}")
        mf = self.max_factor
        if not isinstance(mf, int) or isinstance(mf, bool) or not 1 <= mf <= MAX_FACTOR:
            raise ValueError(f"max_factor must be an integer in 1 … {MAX_FACTOR} (θ(1) … θ(max_factor) are solved as "
                             f"one grid), got {mf!r}")
        validate_dynamics(4, self.param_factor, self.act, self.ode_base, self.time_dt)
        if self.t_rule not in T_RULES:
            raise ValueError(f"t_rule must be one of {T_RULES}, got {self.t_rule!r}")
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
        params = renamed_settings(params)  # configs saved before the rename say policy
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


def inv_freq_buffer(module: nn.Module, layer_type: str | None = None) -> torch.Tensor:
    """The θ buffer of a rotary module (CLEX's: of the module it wraps), of ``layer_type``'s layers where the
    module keeps one per layer type (Gemma 3)."""
    module = getattr(module, "original", module)
    named = getattr(module, f"{layer_type}_inv_freq" if layer_type else "inv_freq", None)
    return named if torch.is_tensor(named) else next(iter(module.buffers()))


class CLEXRotary(nn.Module):
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
        # generation (clex.cache): the KV-cache mode, a fixed t, and state of the recompute mode
        self.cache_mode = "rerotate"
        self.t_override: float | None = None
        self._recorded_ids: torch.Tensor | None = None
        self._attend: torch.Tensor | None = None  # the attention mask of the current tokens, set by the decoder hook
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
        return inv_freq_buffer(self.original, self.layer_type)

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
        """t for a sequence of current length ``n`` under the configured t_rule, clamped."""
        cfg = self.settings
        L = cfg.original_max_position_embeddings
        t = float(math.ceil(n / L)) if cfg.t_rule == "ceil" else n / L
        if t > cfg.max_factor:
            msg = (
                f"sequence length {n} exceeds CLEX's max_factor·L = {cfg.max_factor}·{L}; "
                f"frequencies stay at t = {cfg.max_factor}"
            )
            if not cfg.clamp:
                raise ValueError(f"refused: sequence length {n} exceeds CLEX's max_factor·L = {cfg.max_factor}·{L} "
                                 "and clamp=False; use a shorter input, a larger max_factor, or clamp=True (keeps "
                                 f"t = {cfg.max_factor} beyond it)")
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
        if self.settings.log_scale and int(position_ids.min()) > 0:  # continuing from a KV cache
            self._warn_log_scale_with_cache()
        keys, n = self.token_factors(position_ids)
        with torch.autocast(x.device.type, enabled=False):
            if isinstance(keys, float):  # one t for every token: one θ, broadcast
                inv_freq = self._theta_for(keys, x.device)
            else:  # each sequence at its own t: θ gathered per token from the few distinct t
                values = torch.unique(keys)
                table = torch.stack([self._theta_for(float(v), x.device) for v in values])
                inv_freq = table[torch.searchsorted(values, keys.contiguous()).to(x.device)]
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            scale = self._attention_scaling()
            if self.settings.log_scale:
                # Scaling cos and sin by √s scales every q·k by s: the reference's queries × ln n / ln L.
                L = self.settings.original_max_position_embeddings
                n = torch.as_tensor(n, dtype=torch.float64, device=x.device)
                log_n = torch.sqrt(torch.log(n) / math.log(L)) if L > 1 else torch.ones_like(n)
                scale = (scale * log_n).float()[..., None] if log_n.dim() else scale * float(log_n)
            if not isinstance(scale, float) or scale != 1.0:
                cos, sin = cos * scale, sin * scale
        return cos.to(x.dtype), sin.to(x.dtype)

    def token_factors(self, position_ids: torch.Tensor):
        """``(t, n)`` of the tokens of this forward: a float t when every token shares it, else a tensor of t per
        token (0 marks a LongRoPE base's short set). In eval each sequence follows its own length (its row, or each
        sequence packed into a row; padding left out through the attention mask the decoder hook records); in
        training one t′ per step, from the longest row. ``t_override`` (a float, or one t per row) wins."""
        override = self.t_override
        if self.training:
            n = int(position_ids.max()) + 1
            t = float(override) if override is not None else self.scaling_factor(n)
            return (0.0 if t <= 1.0 and n <= self._short_below else t), n
        attend = self._attend_for(position_ids)
        if position_ids.shape[-1] == 1:  # a decode step: each row's one token ends its sequence
            n = position_ids.long() + 1
            n = n.expand(attend.shape[0], 1) if attend is not None and n.shape[0] != attend.shape[0] else n
        else:
            n = token_lengths(position_ids, attend)
        if override is None:
            t = self._scaling_factors(n)
        else:
            row = torch.as_tensor(override, dtype=torch.float64, device=n.device)
            t, n = torch.broadcast_tensors(row.reshape(-1, 1) if row.dim() else row, n)
        if self._short_below:
            t = t.masked_fill((t <= 1.0) & (n <= self._short_below), 0.0)
        low, high = (float(v) for v in torch.aminmax(t))
        if low != high:
            return t, n
        if self.settings.log_scale and not bool((n == n.flatten()[0]).all()):
            return low, n
        return low, int(n.flatten()[0])

    def _scaling_factors(self, n: torch.Tensor) -> torch.Tensor:
        """:meth:`scaling_factor` for a tensor of lengths (the warning or refusal beyond max_factor·L once)."""
        cfg = self.settings
        L = cfg.original_max_position_embeddings
        t = torch.ceil(n.double() / L) if cfg.t_rule == "ceil" else n.double() / L
        low, high = (float(v) for v in torch.aminmax(t))  # one reduction, one sync
        if high > cfg.max_factor:
            self.scaling_factor(int(n.max()))  # warns once, or refuses with clamp=False
        return t.clamp(1.0, float(cfg.max_factor)) if high > cfg.max_factor or low < 1.0 else t

    def _attend_for(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        attend = self._attend
        if attend is None or attend.dim() != 2 or attend.shape[-1] != position_ids.shape[-1]:
            return None
        if position_ids.shape[0] not in (1, attend.shape[0]):
            return None
        return attend.to(position_ids.device)

    def _theta_for(self, key: float, device) -> torch.Tensor:
        return self._short_set(device) if key == 0.0 else self.frequencies(key).to(device)

    def _warn_log_scale_with_cache(self) -> None:
        if "log_scale" not in self._decode_warned:
            self._decode_warned.add("log_scale")
            warnings.warn(
                "log_scale with a KV cache: cached keys keep the √(ln n/ln L) of the step that wrote them, "
                "so attention logits differ from a full forward (exact only without a cache).",
                stacklevel=3,
            )


def clex_modules(model: nn.Module) -> list[CLEXRotary]:
    """The CLEX rotary modules of ``model`` (empty if it does not use CLEX)."""
    return [m for m in model.modules() if isinstance(m, CLEXRotary)]
ClexRotary = CLEXRotary  # the older spelling
