"""The CLEX ODE solver against closed forms and an independent integration of the reference field."""

from __future__ import annotations

import math

import pytest
import torch

from clex.dynamics import CLEXDynamics, log_ntk_frequencies


def log_theta(d: int, base: float) -> torch.Tensor:
    return -(torch.arange(0, d, 2, dtype=torch.float64) / d) * math.log(base)


def reference_trajectory(dyn: CLEXDynamics, log_theta0: torch.Tensor, times, steps_per_unit=200):
    """Classic RK4 on the reference's field in z = log θ (docs/design.md §2–3), written independently of
    clex.dynamics: dz/dt = σ(x @ W_up^T) @ W_down^T + ξ(t), x = z + log θ_ntk(t), base ode_base."""
    d, base = dyn.rotary_dim, dyn.ode_base
    up, down = dyn.up_proj.detach().double(), dyn.down_proj.detach().double()
    act = torch.tanh if dyn.act == "tanh" else torch.nn.functional.silu
    two_j = torch.arange(0, d, 2, dtype=torch.float64)

    def field(t, z):
        alpha = max(1.0, 2 * t - 1)
        ntk = base * alpha ** (d / (d - 2))
        log_ntk = -(two_j / d) * math.log(ntk)
        xi = -2 * two_j / ((d - 2) * alpha)
        return act((z + log_ntk) @ up.T) @ down.T + xi

    out, z, t = [], log_theta0.clone(), 1.0
    for end in times:
        n = max(1, round((end - t) * steps_per_unit)) if end > t else 0
        h = (end - t) / n if n else 0.0
        for _ in range(n):
            k1 = field(t, z)
            k2 = field(t + h / 2, z + h / 2 * k1)
            k3 = field(t + h / 2, z + h / 2 * k2)
            k4 = field(t + h, z + h * k3)
            z, t = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), t + h
        out.append(z.clone())
    return torch.stack(out)


def random_dynamics(d=32, k=1, act="tanh", base=10000.0, scale=0.05, seed=0, time_dt=0.2):
    torch.manual_seed(seed)
    dyn = CLEXDynamics(d, k, act, base, time_dt)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dyn.down_proj.copy_(torch.randn(dyn.down_proj.shape, generator=g, dtype=torch.float64) * scale)
    return dyn


@pytest.mark.parametrize("base", [10000.0, 1e5, 500000.0])
def test_untrained_is_ntk_with_alpha_2t_minus_1(base):
    d = 64
    dyn = CLEXDynamics(d, ode_base=10000.0)  # the field's base differs from the model's: still NTK
    times = [1, 2, 3.5, 8, 16]
    got = dyn.solve(log_theta(d, base), times)
    for row, t in zip(got, times, strict=True):
        alpha = 2 * t - 1
        expected = log_theta(d, base * alpha ** (d / (d - 2)))
        torch.testing.assert_close(row, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "act,k,base,model_base", [("tanh", 1, 10000.0, 10000.0), ("silu", 2, 10000.0, 1e5), ("tanh", 1, 1e5, 1e5)]
)
def test_trained_trajectory_matches_fine_step_reference(act, k, base, model_base):
    """Same ODE, solved two ways: the residual form at a fine step equals the reference form."""
    dyn = random_dynamics(d=32, k=k, act=act, base=base, time_dt=0.05)
    z0 = log_theta(32, model_base)
    grid = list(range(1, 17))
    got = dyn.solve(z0, grid).exp()
    want = reference_trajectory(dyn, z0, grid).exp()
    rel = ((got - want) / want).abs().max().item()
    assert rel < 1e-7, rel
    # the path really moved away from NTK, so the check is not vacuous
    ntk = log_ntk_frequencies(torch.tensor(grid, dtype=torch.float64), 32, model_base).exp()
    assert ((want - ntk) / ntk).abs().max() > 1e-3


def test_default_step_matches_reference_step_in_fp32_budget():
    """The benchmark's accuracy target: our default step vs the reference's dt = 0.01, rotary dim 128."""
    dyn = random_dynamics(d=128, scale=0.02)
    z0 = log_theta(128, 10000.0)
    ours = dyn.solve(z0, [16.0]).exp()
    reference_step = reference_trajectory(dyn, z0, [16.0], steps_per_unit=100).exp()
    assert ((ours.float().double() - reference_step) / reference_step).abs().max() < 1e-6


def test_continuous_and_restarted_solves_agree():
    dyn = random_dynamics(time_dt=0.05)
    z0 = log_theta(32, 10000.0)
    times = [1.0, 2.0, 2.37, 5.5, 9.0]
    together = dyn.solve(z0, times)
    want = reference_trajectory(dyn, z0, times)
    torch.testing.assert_close(together, want, rtol=0, atol=1e-8)
    # restart from an intermediate point: the residual field needs no knowledge of the start
    resumed = dyn.solve(together[1], [2.37, 5.5], start=2.0)
    torch.testing.assert_close(resumed, together[2:4], rtol=0, atol=1e-8)


def test_gradients_match_finite_differences():
    dyn = random_dynamics(d=8, k=1, scale=0.3)
    z0 = log_theta(8, 10000.0)

    # fp64 leaves: the module keeps its own matrices in fp32, too coarse for finite differences
    up = dyn.up_proj.detach().double().requires_grad_()
    down = dyn.down_proj.detach().double().requires_grad_()

    def g(up, down):  # run the solver's math with these tensors as the parameters
        saved = dyn.up_proj, dyn.down_proj
        del dyn.up_proj, dyn.down_proj
        dyn.up_proj, dyn.down_proj = up, down
        try:
            return dyn._solve(z0, [3.0], torch.float64, 1.0)
        finally:
            del dyn.up_proj, dyn.down_proj
            dyn.up_proj, dyn.down_proj = saved

    assert torch.autograd.gradcheck(g, (up, down), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(rotary_dim=7), "rotary_dim"),
        (dict(rotary_dim=32, param_factor=0), "param_factor"),
        (dict(rotary_dim=32, act="relu"), "act"),
        (dict(rotary_dim=32, time_dt=0.0), "time_dt"),
        (dict(rotary_dim=32, time_dt=-0.1), "time_dt"),
        (dict(rotary_dim=32, time_dt=float("nan")), "time_dt"),
        (dict(rotary_dim=32, ode_base=1.0), "ode_base"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CLEXDynamics(**kwargs)


def test_solve_rejects_decreasing_times():
    dyn = CLEXDynamics(16)
    with pytest.raises(ValueError, match="increasing"):
        dyn.solve(log_theta(16, 1e4), [3.0, 2.0])
    with pytest.raises(ValueError, match="increasing"):
        dyn.solve(log_theta(16, 1e4), [0.5])


def test_matrices_keep_exact_fp32_values_when_model_is_cast():
    dyn = CLEXDynamics(16)
    before = dyn.up_proj.detach().clone()
    dyn.to(torch.bfloat16).half()
    assert dyn.up_proj.dtype == dyn.down_proj.dtype == torch.float32
    assert torch.equal(dyn.up_proj, before)
