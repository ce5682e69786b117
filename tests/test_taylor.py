"""Integral regularizers (TayNODE, RNODE), Taylor mode on torch, and STEER (float64)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchdiffeq._impl.dopri5 import Dopri5Solver
from torchdiffeq._impl.interp import _interp_evaluate, _interp_fit

import regnde
from regnde import regularizers as R
from regnde.adapters.torch.keys import TorchKey
from regnde.adapters.torch.taylor import (
    TaylorFallbackWarning,
    TaylorModeError,
    jvp_derivatives,
    taylor_derivatives,
)
from regnde.adapters.torch.torchdiffeq import TorchdiffeqBackend
from regnde.plugins.manager import registry
from regnde.solvers import DOPRI5

F64 = torch.float64
E2 = (math.e**2 - 1)


class Identity(torch.nn.Module):
    """``y' = y``."""

    def forward(self, t, y):
        return y


class Linear(torch.nn.Module):
    """``y' = A y`` on a 1-D state."""

    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A)

    def forward(self, t, y):
        return self.A @ y


class MLP(torch.nn.Module):
    """A time-dependent field (B, 3) -> (B, 3) with a chosen activation."""

    def __init__(self, act=torch.tanh, seed: int = 0, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = torch.nn.Linear(4, width, dtype=F64)
        self.l2 = torch.nn.Linear(width, 3, dtype=F64)
        self.act = act

    def forward(self, t, y):
        tt = t.to(y.dtype).expand(y.shape[0], 1)
        return self.l2(self.act(self.l1(torch.cat([y, tt], 1)))) * (1 + 0.3 * torch.sin(t))


@pytest.fixture
def problem():
    f = MLP()
    y0 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.0, 1.5, 3, dtype=F64)
    return f, y0, t


def grads(value, module):
    return torch.autograd.grad(value, list(module.parameters()))


def lie_derivatives(f, t, y, order):
    """``[y', ..., y^(order)]`` by nested jvp of Lie derivatives: ``g_{k+1} = dg_k/dt +
    (dg_k/dy) f`` (independent of regnde's code)."""
    gs = [f]
    for _ in range(1, order):
        g = gs[-1]
        gs.append(lambda t, y, g=g: torch.func.jvp(g, (t, y), (torch.ones_like(t), f(t, y)))[1])
    return [g(t, y) for g in gs]


# -- exact values --------
@pytest.mark.parametrize("order", [1, 2, 3, 4, 6])
def test_exponential_growth_gives_the_same_integral_for_every_order(order):
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.ones(1, dtype=F64)
    sol = regnde.solve(Identity(), y0, t, rtol=1e-10, atol=1e-10,
                       regularizer=R.TaylorDerivative(order))
    assert sol.reg.item() == pytest.approx(E2 / 2, rel=1e-8)
    if order == 3:
        ref = regnde.solve(Identity(), y0, t, rtol=1e-10, atol=1e-10,
                           regularizer=R.TaylorDerivative(3, mode="jvp"))
        assert ref.reg.item() == pytest.approx(E2 / 2, rel=1e-8)


def test_kinetic_energy_of_exponential_growth():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = regnde.solve(Identity(), torch.ones(1, dtype=F64), t, rtol=1e-10, atol=1e-10,
                       regularizer=R.KineticEnergy())
    assert sol.reg.item() == pytest.approx(E2 / 4, rel=1e-8)
    back = regnde.solve(Identity(), torch.full((1,), math.e, dtype=F64), t.flip(0), rtol=1e-10,
                        atol=1e-10, regularizer=R.KineticEnergy())
    assert back.reg.item() == pytest.approx(E2 / 4, rel=1e-8)  # |dt|: positive backwards too


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_jacobian_frobenius_is_unbiased_for_a_linear_field(noise):
    D, t1 = 6, 0.5
    A = torch.randn(D, D, dtype=F64, generator=torch.Generator().manual_seed(3)) * 0.4
    f = Linear(A)
    y0 = torch.ones(D, dtype=F64)
    t = torch.tensor([0.0, t1], dtype=F64)
    with torch.no_grad():
        vals = torch.stack([
            regnde.solve(f, y0, t, rtol=1e-7, atol=1e-7, key=k,
                         regularizer=R.JacobianFrobenius(noise=noise)).reg
            for k in range(150)
        ])
    expected = float((A**2).sum()) * t1 / D
    se = float(vals.std()) / math.sqrt(len(vals))
    assert abs(float(vals.mean()) - expected) < 3 * se
    assert se > 0  # the keys draw different noise ...
    again = regnde.solve(f, y0, t, key=7, regularizer=R.JacobianFrobenius(noise=noise)).reg
    assert again.item() == pytest.approx(vals[7].item(), rel=1e-12)  # ... the same key the same


# -- Taylor mode --------
ACTIVATIONS = {
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": lambda x: F.softplus(x, beta=2.0),
    "silu": F.silu, "relu": F.relu, "sin": torch.sin, "exp_log": lambda x: torch.log(1 + x.exp()),
    "div_pow": lambda x: x / (2 + x.cos()) + (x * x + 1) ** 1.5 - (x**2 + 1).sqrt(),
}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_taylor_coefficients_equal_nested_jvp(act):
    f = MLP(ACTIVATIONS[act], seed=2)
    y = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor(0.7, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaylorFallbackWarning)  # every op here has a rule
        ours = taylor_derivatives(f, t, y, 4)
    ref = lie_derivatives(f, t, y, 4)
    assert torch.equal(ours[0], f(t, y))  # the traced call is f itself
    for k, (a, b) in enumerate(zip(ours, ref, strict=True), start=1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item(),
                                   msg=f"order {k}")
    for a, b in zip(jvp_derivatives(f, t, y, 4), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item())


def test_operation_without_rule_falls_back_to_nested_jvp_with_a_warning():
    f = MLP(F.gelu, seed=4)
    y = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    t = torch.tensor(0.2, dtype=F64)
    with pytest.warns(TaylorFallbackWarning, match=r"gelu.*nested forward-mode jvp"):
        ours = taylor_derivatives(f, t, y, 3)
    for a, b in zip(ours, lie_derivatives(f, t, y, 3), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    # and it is differentiable w.r.t. the parameters
    g = grads(ours[-1].square().sum(), f)
    h = grads(lie_derivatives(f, t, y, 3)[-1].square().sum(), f)
    for a, b in zip(g, h, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_in_place_operations_are_refused_by_name():
    def f(t, y):
        h = y * 2
        h.add_(1.0)
        return h

    with pytest.raises(TaylorModeError, match="in-place.*add_"):
        taylor_derivatives(f, torch.tensor(0.0, dtype=F64), torch.ones(2, dtype=F64), 2)


# -- the augmented solve --------
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_augmented_solve_takes_the_plain_steps(problem, direction):
    f, y0, t = problem
    t = t if direction > 0 else t.flip(0)
    plain = regnde.solve(f, y0, t, rtol=1e-6, atol=1e-6, regularizer=R.GlobalStiffness())
    reg = R.TaylorDerivative(2) + R.KineticEnergy() + R.JacobianFrobenius() + R.GlobalStiffness()
    sol = regnde.solve(f, y0, t, rtol=1e-6, atol=1e-6, regularizer=reg, key=0)
    assert torch.equal(sol.ys, plain.ys)
    for name in ("t", "dt", "dt_taken", "error", "y"):
        assert torch.equal(getattr(sol.trace, name), getattr(plain.trace, name)), name
    torch.testing.assert_close(sol.trace.stiffness, plain.trace.stiffness, rtol=1e-14, atol=0)
    assert sol.stats.nfe == plain.stats.nfe and sol.stats.n_steps == plain.stats.n_steps
    assert sol.stats.nfe_reg == sol.stats.nfe  # one integrand evaluation per evaluation of f
    assert sol.reg.item() > 0


def replay_taylor2(f, y0, trace, t_end):
    """``R_2`` by re-running the recorded steps of the augmented system ``(y, r)`` with fixed
    ``dt`` in plain torch: dopri5 stages, ``y''`` by ``torch.func.jvp``, and the dopri5 dense
    output for the last step, which overshoots ``t_end``."""
    def aug(t, y):
        fy = f(t, y)
        ydd = torch.func.jvp(f, (t, y), (torch.ones_like(t), fy))[1]
        return fy, ydd.square().mean()

    y, r = y0, torch.zeros((), dtype=F64)
    tab = DOPRI5
    for t0, dt in zip(trace.t, trace.dt_taken, strict=True):
        ky, kr = [], []
        for i in range(tab.stages):
            yi = y + dt * sum(a * k for a, k in zip(tab.a[i], ky, strict=False)) if i else y
            fy, fr = aug(t0 + tab.c[i] * dt, yi)
            ky.append(fy)
            kr.append(fr)
        y1 = y + dt * sum(b * k for b, k in zip(tab.b, ky, strict=True))
        r1 = r + dt * sum(b * k for b, k in zip(tab.b, kr, strict=True))
        if t0 + dt > t_end:  # interpolate back as torchdiffeq does
            mid = Dopri5Solver.mid.to(F64)
            r_mid = r + dt * sum(m * k for m, k in zip(mid, kr, strict=True))
            coeff = _interp_fit(r, r1, r_mid, kr[0], kr[-1], dt)
            return _interp_evaluate(coeff, t0, t0 + dt, t_end)
        y, r = y1, r1
    return r


def test_gradient_equals_fixed_grid_replay_under_direct(problem):
    f, y0, t = problem
    sol = regnde.solve(f, y0, t, rtol=1e-6, atol=1e-6, regularizer=R.TaylorDerivative(2))
    assert sol.trace.n_steps >= 3
    replay = replay_taylor2(f, y0, sol.trace, t[-1])
    torch.testing.assert_close(sol.reg, replay, rtol=1e-11, atol=0)
    for g, h in zip(grads(sol.reg, f), grads(replay, f), strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-13)


def test_adjoint_gradients_are_finite_nonzero_and_close_to_direct(problem):
    f, y0, t = problem
    reg = R.TaylorDerivative(3) + 0.5 * R.KineticEnergy() + R.JacobianFrobenius()
    direct = regnde.solve(f, y0, t, rtol=1e-9, atol=1e-9, regularizer=reg, key=1)
    adj = regnde.solve(f, y0, t, rtol=1e-9, atol=1e-9, regularizer=reg, key=1,
                       sensitivity="adjoint")
    assert torch.equal(adj.ys, direct.ys)
    torch.testing.assert_close(adj.reg, direct.reg, rtol=1e-12, atol=0)
    for g, h in zip(grads(adj.reg + adj.ys.sum(), f), grads(direct.reg + direct.ys.sum(), f),
                    strict=True):
        assert torch.isfinite(g).all() and g.abs().max() > 0
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("sensitivity", ["direct", "adjoint"])
def test_composes_with_local_error(problem, sensitivity):
    f, y0, t = problem
    reg = 2.0 * R.TaylorDerivative(2) + 0.5 * R.LocalError()
    sol = regnde.solve(f, y0, t, rtol=1e-6, atol=1e-6, regularizer=reg, key=3,
                       sensitivity=sensitivity)
    taylor = regnde.solve(f, y0, t, rtol=1e-6, atol=1e-6, regularizer=R.TaylorDerivative(2))
    local = regnde.solve(f, y0, t, rtol=1e-6, atol=1e-6, regularizer=R.LocalError(),
                         key=TorchKey(3, path=(1,)), sensitivity=sensitivity)
    torch.testing.assert_close(sol.reg, 2.0 * taylor.reg + 0.5 * local.reg, rtol=1e-12, atol=0)
    assert sol.stats.nfe_reg == sol.stats.nfe + local.stats.nfe_reg  # integrands + local step
    for g in grads(sol.reg, f):
        assert torch.isfinite(g).all()


def test_drop_in_refuses_integrals_and_points_to_solve():
    with pytest.raises(ValueError, match=r"regnde\.solve"):
        regnde.regularize(R.TaylorDerivative(2) + R.LocalError())


def test_backend_without_augmented_states_raises(problem, monkeypatch):
    f, y0, t = problem
    monkeypatch.setattr(TorchdiffeqBackend, "augments", False)
    with pytest.raises(ValueError, match="extra state.*'torchdiffeq' does not support"):
        regnde.solve(f, y0, t, regularizer=R.KineticEnergy())


@pytest.mark.parametrize("order", [0, -1, 2.5, 3.0, True, "3"])
def test_bad_orders_and_options(order):
    with pytest.raises(ValueError, match="int >= 1"):
        R.TaylorDerivative(order)
    with pytest.raises(ValueError, match="mode"):
        R.TaylorDerivative(2, mode="jet")
    with pytest.raises(ValueError, match="noise"):
        R.JacobianFrobenius(noise="uniform")


def test_registered_by_name(problem):
    f, y0, t = problem
    for name, cls in (("taylor-derivative", R.TaylorDerivative),
                      ("kinetic-energy", R.KineticEnergy),
                      ("jacobian-frobenius", R.JacobianFrobenius)):
        assert registry().get("regularizer", name) is cls
    sol = regnde.solve(f, y0, t, regularizer="kinetic-energy")
    assert sol.reg.item() > 0


# -- STEER --------
def test_steer_draws_the_end_time_from_the_key(problem):
    f, y0, t = problem
    t2 = torch.tensor([0.0, 1.0], dtype=F64)
    ends = torch.stack([regnde.steer(t2, 0.4, key=k)[-1] for k in range(200)])
    assert ends.min() >= 0.6 and ends.max() <= 1.4 and ends.std() > 0.15
    assert torch.equal(regnde.steer(t, 0.5, key=4), regnde.steer(t, 0.5, key=4))
    assert torch.equal(regnde.steer(t, 0.5, key=4)[:-1], t[:-1])
    sol = regnde.solve(f, y0, t, steer=0.5, key=4, regularizer=R.KineticEnergy())
    ref = regnde.solve(f, y0, regnde.steer(t, 0.5, key=4), regularizer=R.KineticEnergy(), key=4)
    assert torch.equal(sol.ys, ref.ys) and torch.equal(sol.reg, ref.reg)


@pytest.mark.parametrize("b", [1.0, 2.0, 0.0, -0.1, float("nan")])
def test_steer_window_must_fit(b):
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="STEER"):
        regnde.steer(t, b, key=0)
    with pytest.raises(ValueError, match="STEER"):
        regnde.solve(Identity(), torch.ones(1, dtype=F64), t, steer=b, key=0)
