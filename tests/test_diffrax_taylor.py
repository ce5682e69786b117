"""Integral regularizers (TayNODE, RNODE) on diffrax: exact values, torch agreement, the plain
solve's steps, gradients against a fixed-grid replay, the adjoint, composition, jit (float64).

JAX compiles every distinct solve, so the problems here are few, small and reused."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

jax.config.update("jax_enable_x64", True)

import regnde  # noqa: E402
from regnde import regularizers as R  # noqa: E402
from regnde.adapters.jax.augment import (  # noqa: E402
    JaxPoint,
    TaylorModeError,
    jvp_derivatives,
    taylor_derivatives,
)
from regnde.solvers import DOPRI5  # noqa: E402

E2 = math.e**2 - 1


def ident(t, y):
    return y


class MLP(eqx.Module):
    """A time-dependent field (B, 3) -> (B, 3): ``l2(act(l1([y, t]))) * (1 + 0.3 sin t)``."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array
    act: str = eqx.field(static=True, default="tanh")

    def __call__(self, t, y):
        tt = jnp.broadcast_to(t, (y.shape[0], 1)).astype(y.dtype)
        h = jnp.concatenate([y, tt], 1) @ self.w1.T + self.b1
        h = {"tanh": jnp.tanh, "relu": jax.nn.relu, "softplus": jax.nn.softplus,
             "logaddexp": lambda x: jnp.logaddexp(x, 0.5 * x)}[self.act](h)
        return (h @ self.w2.T + self.b2) * (1 + 0.3 * jnp.sin(t))


def torch_mlp(seed: int = 0, width: int = 16):
    """The torch MLP of tests/test_taylor.py, and the same weights as a JAX :class:`MLP`."""
    torch.manual_seed(seed)
    l1 = torch.nn.Linear(4, width, dtype=torch.float64)
    l2 = torch.nn.Linear(width, 3, dtype=torch.float64)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = l1, l2

        def forward(self, t, y):
            tt = t.to(y.dtype).expand(y.shape[0], 1)
            return self.l2(torch.tanh(self.l1(torch.cat([y, tt], 1)))) * (1 + 0.3 * torch.sin(t))

    def j(p):
        return jnp.asarray(p.detach().numpy())

    return Field(), MLP(j(l1.weight), j(l1.bias), j(l2.weight), j(l2.bias))


TF, F = torch_mlp()
Y0 = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)))
T = jnp.linspace(0.0, 1.5, 3)


# -- exact values ----------------------------------------------------------------------------
def test_exponential_growth_gives_the_same_integral_for_every_order_and_kinetic_energy():
    """``y' = y``, ``y(0) = 1`` on ``[0, 1]``: ``R_K = (e^2 - 1) / 2`` for every ``K`` and the
    kinetic energy is half of it. One solve (one compile) carries all five integrals with
    weights 1, 2, 4, 8 (K = 1..4) and 16 (kinetic energy); backwards too."""
    reg = (R.TaylorDerivative(1) + 2 * R.TaylorDerivative(2) + 4 * R.TaylorDerivative(3)
           + 8 * R.TaylorDerivative(4) + 16 * R.KineticEnergy())
    expected = 15 * E2 / 2 + 16 * E2 / 4
    t = jnp.array([0.0, 1.0])
    sol = regnde.solve(ident, jnp.ones(1), t, rtol=1e-10, atol=1e-10, regularizer=reg)
    assert float(sol.reg) == pytest.approx(expected, rel=1e-8)
    back = regnde.solve(ident, jnp.full(1, math.e), t[::-1], rtol=1e-10, atol=1e-10,
                        regularizer=reg)
    assert float(back.reg) == pytest.approx(expected, rel=1e-8)  # |dt|: positive backwards


def test_jacobian_frobenius_is_unbiased_for_a_linear_field():
    D, t1 = 6, 0.5
    A = jnp.asarray(np.random.default_rng(3).standard_normal((D, D))) * 0.4
    regs = [R.JacobianFrobenius(noise="gaussian"), R.JacobianFrobenius(noise="rademacher")]

    def values(key):
        return jnp.stack([regnde.solve(lambda t, y: A @ y, jnp.ones(D), jnp.array([0.0, t1]),
                                       rtol=1e-7, atol=1e-7, key=key, regularizer=reg).reg
                          for reg in regs])

    keys = jax.random.split(jax.random.key(0), 200)
    keys = jnp.concatenate([keys, keys[7:8]])  # key 7 once more
    vals = np.asarray(jax.jit(jax.vmap(values))(keys))
    expected = float(jnp.sum(A**2)) * t1 / D
    for v in vals[:-1].T:
        se = float(v.std()) / math.sqrt(len(v))
        assert se > 0 and abs(float(v.mean()) - expected) < 3 * se
    np.testing.assert_allclose(vals[-1], vals[7], rtol=1e-13)  # same key, same noise


# -- torch and JAX agree ---------------------------------------------------------------------
def test_torch_and_jax_give_the_same_taylor_integrals():
    """R_K of the same MLP weights on torchdiffeq (Taylor tape) and diffrax (jet), K = 1..4."""
    ty0, tt = torch.tensor(np.asarray(Y0)), torch.tensor(np.asarray(T))
    for k in (1, 2, 3, 4):
        ours = regnde.solve(F, Y0, T, rtol=1e-10, atol=1e-10, regularizer=R.TaylorDerivative(k))
        with torch.no_grad():
            ref = regnde.solve(TF, ty0, tt, rtol=1e-10, atol=1e-10,
                               regularizer=R.TaylorDerivative(k))
        assert float(ours.reg) == pytest.approx(ref.reg.item(), rel=1e-6), k
        np.testing.assert_allclose(np.asarray(ours.ys), ref.ys.numpy(), rtol=0, atol=1e-8)


# -- Taylor mode -----------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["tanh", "relu", "softplus", "logaddexp"])
def test_jet_derivatives_equal_nested_jvp_including_custom_jvp_activations(act):
    """jet alone raises UnexpectedTracerError on relu/softplus/logaddexp (custom_jvp); regnde
    inlines their primal implementations."""
    f = MLP(F.w1, F.b1, F.w2, F.b2, act)
    t = jnp.asarray(0.7)
    ours = taylor_derivatives(f, t, Y0, 4)
    ref = jvp_derivatives(f, t, Y0, 4)
    assert bool(jnp.array_equal(ours[0], f(t, Y0)))
    for k, (a, b) in enumerate(zip(ours, ref, strict=True), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12 * float(jnp.max(jnp.abs(b))),
                                   err_msg=f"order {k}")
    point = JaxPoint(f, t, Y0)
    high = point.derivatives(3)
    assert point.derivatives(2)[1] is high[1]  # computed once per point


def test_primitive_without_jet_rule_is_named_with_the_fallback():
    def f(t, y):
        return jax.lax.lgamma(y + 3.0) * t

    with pytest.raises(TaylorModeError, match=r"'lgamma'.*mode='jvp'"):
        taylor_derivatives(f, jnp.asarray(0.1), jnp.ones(2), 3)
    ref = jvp_derivatives(f, jnp.asarray(0.1), jnp.ones(2), 3)  # the fallback works
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in ref)


# -- the augmented solve ---------------------------------------------------------------------
@pytest.mark.parametrize("direction", [1, -1])
def test_augmented_solve_takes_the_plain_steps(direction):
    t = T if direction > 0 else T[::-1]
    plain = regnde.solve(F, Y0, t, rtol=1e-6, atol=1e-6, regularizer=R.GlobalStiffness())
    reg = R.TaylorDerivative(2) + R.KineticEnergy() + R.JacobianFrobenius() + R.GlobalStiffness()
    sol = regnde.solve(F, Y0, t, rtol=1e-6, atol=1e-6, regularizer=reg, key=0)
    assert bool(jnp.array_equal(sol.ys, plain.ys))
    for name in ("t", "dt", "mask", "error", "stiffness", "y"):
        assert bool(jnp.array_equal(getattr(sol.trace, name), getattr(plain.trace, name))), name
    assert int(sol.stats.nfe) == int(plain.stats.nfe)
    assert int(sol.stats.n_steps) == int(plain.stats.n_steps) >= 3
    # one integrand evaluation per evaluation of the augmented field; stats.nfe also counts
    # the 2 of the initial step selection, which evaluates f alone (docs/diffrax.md)
    assert int(sol.stats.nfe_reg) == int(sol.stats.nfe) - 2
    assert float(sol.reg) > 0


def replay_taylor2(f, y0, trace):
    """``R_2`` by re-running the recorded steps of ``(y, r)`` with fixed ``dt`` (dopri5 stages,
    ``y''`` by nested ``jax.jvp``); diffrax clips the last step at ``t1``."""
    def aug(t, y):
        fy = f(t, y)
        ydd = jax.jvp(f, (t, y), (jnp.ones_like(t), fy))[1]
        return fy, jnp.mean(ydd**2)

    n = int(trace.n_steps)
    y, r = y0, jnp.zeros(())
    for t0, dt in zip(np.asarray(trace.t)[:n], np.asarray(trace.dt)[:n], strict=True):
        ky, kr = [], []
        for i in range(DOPRI5.stages):
            yi = y + dt * sum(a * k for a, k in zip(DOPRI5.a[i], ky, strict=False)) if i else y
            fy, fr = aug(jnp.asarray(t0 + DOPRI5.c[i] * dt), yi)
            ky.append(fy)
            kr.append(fr)
        y = y + dt * sum(b * k for b, k in zip(DOPRI5.b, ky, strict=True))
        r = r + dt * sum(b * k for b, k in zip(DOPRI5.b, kr, strict=True))
    return r


def test_gradient_equals_fixed_grid_replay_under_direct():
    reg = R.TaylorDerivative(2)

    def loss(f):
        sol = regnde.solve(f, Y0, T, rtol=1e-6, atol=1e-6, regularizer=reg)
        return sol.reg, sol.trace

    (value, trace), g = eqx.filter_value_and_grad(loss, has_aux=True)(F)
    assert int(trace.n_steps) >= 3
    replay, h = eqx.filter_value_and_grad(lambda f: replay_taylor2(f, Y0, trace))(F)
    assert float(value) == pytest.approx(float(replay), rel=1e-11)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(h), strict=True):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


def test_adjoint_and_jit_gradients_with_local_error():
    """Adjoint gradients are finite and close to direct ones; composition with LocalError
    adds the local step's value; everything under eqx.filter_jit."""
    reg = R.TaylorDerivative(2) + 0.5 * R.JacobianFrobenius() + 0.1 * R.LocalError()

    @eqx.filter_jit
    def run(f, sensitivity):
        def loss(f):
            sol = regnde.solve(f, Y0, T, rtol=1e-8, atol=1e-8, regularizer=reg, key=1,
                               sensitivity=sensitivity, trace="summary")
            return sol.reg + sol.ys.sum(), (sol.reg, sol.stats.nfe_reg, sol.stats.nfe)
        return eqx.filter_grad(loss, has_aux=True)(f)

    gd, (vd, nd, nfe) = run(F, "direct")
    ga, (va, na, _) = run(F, "adjoint")
    assert float(va) == pytest.approx(float(vd), rel=1e-12)
    # integrand evaluations (one per evaluation of the augmented field) + the local step's 7
    assert int(nd) == int(na) == int(nfe) - 2 + 7
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gd), strict=True):
        assert bool(jnp.all(jnp.isfinite(a))) and float(jnp.max(jnp.abs(a))) > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_jit_and_eager_agree_and_need_a_key_only_for_noise():
    reg = R.KineticEnergy()
    eager = regnde.solve(F, Y0, T, regularizer=reg)
    jitted = jax.jit(lambda y: regnde.solve(F, y, T, regularizer=reg).reg)(Y0)
    assert float(jitted) == pytest.approx(float(eager.reg), rel=1e-13)
