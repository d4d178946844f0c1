"""The CLEX frequency ODE and its solver. No model code lives here.

State: ``z(t) = log θ(t)`` over the ``d/2`` rotary pairs, ``z(1) = log θ``. Field (docs/design.md §2–3)::

    dz/dt = W_down · σ(W_up · (z + log θ_ntk(t))) + ξ(t),   ξ(t) = d/dt log θ_ntk(t)

with ``θ_ntk`` NTK-aware scaling at ``α(t) = 2t − 1`` in base ``ode_base``. The NTK part has a closed
form, so we solve only the learned residual ``u = z − log θ_ntk(t)``::

    du/dt = W_down · σ(W_up · (u + 2·log θ_ntk(t))),   u(1) = log θ − log θ_ntk(1)

That field has no ``1/(2t−1)`` term, is exactly zero when untrained (``W_down = 0``: CLEX is then NTK
with α = 2t − 1, whatever ``ode_base`` is) and is smooth, so classic RK4 with a step of 0.2 matches
the reference's step of 0.01 to better than 1e-6 (``tests/test_dynamics.py`` holds the accuracy,
``benchmarks/overhead.py`` the time). The solve runs in float64 with autocast off: it costs a few
hundred tiny mat-vecs, and fp32 rounding, not the step, limits the reference's accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

ACTIVATIONS = {"tanh": torch.tanh, "silu": nn.functional.silu}


def ntk_alpha(t: torch.Tensor | float) -> torch.Tensor:
    """CLEX's NTK coefficient α(t) = 2t − 1, held at 1 for t ≤ 1."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.clamp(2.0 * t - 1.0, min=1.0)


def pair_exponents(rotary_dim: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """``2j`` for the rotary pairs j = 0 … d/2 − 1."""
    return torch.arange(0, rotary_dim, 2, dtype=dtype, device=device)


def log_ntk_frequencies(
    t: torch.Tensor | float, rotary_dim: int, base: float, dtype=torch.float64, device=None
) -> torch.Tensor:
    """``log θ_ntk(t)`` for every pair; ``t`` may be a vector (then one row per time).

    ``θ_ntk_j(t) = (base · α^(d/(d−2)))^(−2j/d) = base^(−2j/d) · α^(−2j/(d−2))``.
    """
    two_j = pair_exponents(rotary_dim, dtype, device)
    t = torch.as_tensor(t, dtype=dtype, device=device)
    log_alpha = torch.log(torch.clamp(2.0 * t - 1.0, min=1.0))
    return -(two_j / rotary_dim) * math.log(base) - (two_j / (rotary_dim - 2)) * log_alpha[..., None]


class CLEXDynamics(nn.Module):
    """The learned part of CLEX: ``W_up`` (k·d × d/2) and ``W_down`` (d/2 × k·d), shared by all layers.

    ``solve`` integrates the frequency ODE; everything else about CLEX (which t, which positions)
    lives in ``clex.rotary``.
    """

    def __init__(
        self,
        rotary_dim: int,
        param_factor: int = 1,
        act: str = "tanh",
        ode_base: float = 10000.0,
        time_dt: float = 0.2,
    ) -> None:
        super().__init__()
        validate_dynamics(rotary_dim, param_factor, act, ode_base, time_dt)
        self.rotary_dim = rotary_dim
        self.param_factor = param_factor
        self.act = act
        self.ode_base = float(ode_base)
        self.time_dt = float(time_dt)
        hidden = param_factor * rotary_dim
        self.up_proj = nn.Parameter(torch.empty(hidden, rotary_dim // 2))
        self.down_proj = nn.Parameter(torch.empty(rotary_dim // 2, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: its ``kaiming_uniform_(a=√5)`` on a (d/2, k·d) tensor is U(±1/√(k·d));
        ``W_down = 0`` makes an untrained CLEX exactly NTK with α = 2t − 1."""
        from transformers import initialization as init  # respects weights already loaded

        bound = 1.0 / math.sqrt(self.up_proj.shape[0])
        init.uniform_(self.up_proj, -bound, bound)
        init.zeros_(self.down_proj)

    def _apply(self, fn, recurse=True):
        """Keep the two matrices in fp32, with their exact values, whatever ``model.to(dtype)`` asks:
        the values are moved, never rounded through the requested dtype (the solve runs in fp64)."""
        saved = {name: p.data for name, p in self._parameters.items() if p is not None}
        super()._apply(fn, recurse)
        for name, p in self._parameters.items():
            if p is not None and p.dtype != torch.float32 and p.device.type != "meta":
                p.data = saved[name].to(device=p.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (
            f"rotary_dim={self.rotary_dim}, param_factor={self.param_factor}, act={self.act}, "
            f"ode_base={self.ode_base:g}, time_dt={self.time_dt:g}"
        )

    def solve(
        self,
        log_start: torch.Tensor,
        times: Sequence[float],
        dtype: torch.dtype = torch.float64,
        start: float = 1.0,
    ) -> torch.Tensor:
        """``log θ(t)`` at each of ``times`` (increasing, all ≥ ``start``), one row each, in ``dtype``.

        ``log_start`` is ``log θ(start)``: ``log θ`` of the model for the default ``start = 1``.
        Integrates from ``start`` through every requested time in one pass: each interval between
        consecutive times gets ``ceil(length / time_dt)`` equal RK4 steps, so requested times are hit
        exactly (the integer grid 1 … max_factor with the default step lands on the grid).
        Differentiable in ``up_proj`` / ``down_proj``.
        """
        times = [float(t) for t in times]
        if not times:
            raise ValueError("times must not be empty")
        if start < 1.0 or any(b < a for a, b in pairwise([start, *times])):
            raise ValueError(f"times must be increasing from start = {start} >= 1, got {times}")
        device = self.up_proj.device
        with torch.autocast(device.type, enabled=False):
            return self._solve(log_start.to(device, dtype), times, dtype, float(start))

    def _solve(self, log_start: torch.Tensor, times: list[float], dtype: torch.dtype, start: float):
        d, base, device = self.rotary_dim, self.ode_base, log_start.device
        # Node times (step ends) and stage mid-points of the whole pass, laid out in advance so that
        # the time-dependent input W_up · 2 log θ_ntk(t) costs one mat-mul for all stages.
        nodes, steps_per_interval = [start], []
        for end in times:
            n = math.ceil((end - start) / self.time_dt - 1e-9) if end > start else 0
            nodes += [start + (end - start) * (i + 1) / n for i in range(n)]
            steps_per_interval.append(n)
            start = end
        node_t = torch.tensor(nodes, dtype=dtype, device=device)
        mid_t = (node_t[:-1] + node_t[1:]) / 2
        w_up, w_down = self.up_proj.to(dtype), self.down_proj.to(dtype)
        log_ntk_nodes = log_ntk_frequencies(node_t, d, base, dtype, device)
        bias_nodes = (2.0 * log_ntk_nodes) @ w_up.T
        bias_mids = (2.0 * log_ntk_frequencies(mid_t, d, base, dtype, device)) @ w_up.T
        act, up_t, down_t = ACTIVATIONS[self.act], w_up.T, w_down.T

        def f(u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return act(torch.addmm(bias, u, up_t)) @ down_t

        u = (log_start - log_ntk_nodes[0])[None]
        out, i = [], 0
        for n in steps_per_interval:
            for _ in range(n):
                h = nodes[i + 1] - nodes[i]
                b0, bm, b1 = bias_nodes[i : i + 1], bias_mids[i : i + 1], bias_nodes[i + 1 : i + 2]
                k1 = f(u, b0)
                k2 = f(u + (h / 2) * k1, bm)
                k3 = f(u + (h / 2) * k2, bm)
                k4 = f(u + h * k3, b1)
                u = u + (h / 6) * (k1 + 2 * (k2 + k3) + k4)
                i += 1
            out.append(u[0] + log_ntk_nodes[i])
        return torch.stack(out)

    def parameters_finite(self) -> bool:
        return bool(torch.isfinite(self.up_proj).all() and torch.isfinite(self.down_proj).all())


def validate_dynamics(rotary_dim: int, param_factor: int, act: str, ode_base: float, time_dt: float) -> None:
    """Raise ``ValueError`` naming the bad parameter."""
    if not isinstance(rotary_dim, int) or rotary_dim < 4 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even integer >= 4, got {rotary_dim!r}")
    if not isinstance(param_factor, int) or isinstance(param_factor, bool) or param_factor < 1:
        raise ValueError(f"param_factor must be an integer >= 1, got {param_factor!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if not _finite_positive(ode_base) or ode_base <= 1:
        raise ValueError(f"ode_base must be a finite number > 1, got {ode_base!r}")
    if not _finite_positive(time_dt) or time_dt > 1:
        raise ValueError(f"time_dt must be a number in (0, 1], got {time_dt!r}")


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
