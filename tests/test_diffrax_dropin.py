"""``regnde.diffrax.Regularized``: the drop-in for unchanged ``diffrax.diffeqsolve`` code."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
dfx = pytest.importorskip("diffrax")

import jax.numpy as jnp  # noqa: E402

import regnde  # noqa: E402
import regnde.diffrax as rd  # noqa: E402
from regnde import regularizers as R  # noqa: E402

jax.config.update("jax_enable_x64", True)

W = jnp.array([[0.0, 1.0], [-4.0, -0.3]])
Y0 = jnp.ones(2)
TOL = 1e-6


def vf(t, y, args):
    return jnp.tanh(y @ args.T) * 3


TERM = dfx.ODETerm(vf)
CTRL = dfx.PIDController(rtol=TOL, atol=TOL)


def solve(solver, a=0.0, b=3.0, args=W, **kw):
    return dfx.diffeqsolve(TERM, solver, a, b, 0.01 if b > a else -0.01, Y0, args=args,
                           stepsize_controller=CTRL,
                           saveat=dfx.SaveAt(ts=jnp.linspace(a, b, 4), solver_state=True), **kw)


LOCAL = R.LocalError(sampler="unbiased")


@pytest.mark.parametrize("solver", [dfx.Tsit5(), dfx.Dopri5(), dfx.Bosh3(), dfx.Kvaerno5()],
                         ids=["tsit5", "dopri5", "bosh3", "kvaerno5"])
def test_same_steps_and_outputs_as_the_wrapped_solver(solver):
    plain = solve(solver)
    wrapped = solve(rd.Regularized(solver, LOCAL + R.GlobalError(), key=0, span=(0.0, 3.0),
                                   rtol=TOL, atol=TOL))
    assert bool(jnp.all(plain.ys == wrapped.ys))
    assert int(plain.stats["num_accepted_steps"]) == int(wrapped.stats["num_accepted_steps"])
    assert int(plain.stats["num_rejected_steps"]) == int(wrapped.stats["num_rejected_steps"])
    value = rd.value(wrapped)
    assert jnp.isfinite(value) and float(value) > 0


@pytest.mark.parametrize("reg", [LOCAL, R.GlobalError(), LOCAL + 0.5 * R.GlobalError()],
                         ids=["local", "global", "sum"])
@pytest.mark.parametrize("span", [(0.0, 3.0), (3.0, 0.0)], ids=["forward", "reverse"])
def test_value_equals_regnde_solve_for_the_same_key(reg, span):
    a, b = span
    sol = regnde.solve(lambda t, y: vf(t, y, W), Y0, jnp.array([a, b]), backend="diffrax",
                       method="tsit5", regularizer=reg, key=5, dt0=0.01 if b > a else -0.01)
    wrapped = solve(rd.Regularized(dfx.Tsit5(), reg, key=5, span=span, rtol=TOL, atol=TOL),
                    a, b)
    assert float(rd.value(wrapped)) == pytest.approx(float(sol.reg), rel=1e-8)


@pytest.mark.parametrize("reg", [LOCAL, R.GlobalError()], ids=["local", "global"])
def test_jit_and_grad_equal_regnde_solves(reg):
    """regnde.solve's gradients are tested against a fixed-grid replay; the wrapper's must be
    the same numbers (same steps, same tau, same constants)."""
    wr = rd.Regularized(dfx.Tsit5(), reg, key=1, span=(0.0, 3.0), rtol=TOL, atol=TOL)

    @jax.jit
    def wrapped(w):
        return rd.value(solve(wr, args=w))

    def direct(w):
        return regnde.solve(lambda t, y: vf(t, y, w), Y0, jnp.array([0.0, 3.0]),
                            backend="diffrax", method="tsit5", regularizer=reg, key=1,
                            dt0=0.01).reg

    g, ref = jax.grad(wrapped)(W), jax.grad(direct)(W)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
    assert jnp.allclose(g, ref, rtol=1e-6, atol=1e-9)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="key=.*span="):
        rd.Regularized(dfx.Tsit5(), LOCAL)
    with pytest.raises(ValueError, match="inside diffrax's solve"):
        rd.Regularized(dfx.Tsit5(), R.LocalError(sampler="biased"), key=0, span=(0, 1))
    with pytest.raises(ValueError, match="adaptive diffrax solver"):
        rd.Regularized(dfx.Euler(), R.GlobalError())
    plain = dfx.diffeqsolve(TERM, dfx.Tsit5(), 0.0, 1.0, 0.01, Y0, args=W,
                            stepsize_controller=CTRL)
    with pytest.raises(ValueError, match="solver_state=True"):
        rd.value(plain)
    stated = dfx.diffeqsolve(TERM, dfx.Tsit5(), 0.0, 1.0, 0.01, Y0, args=W,
                             stepsize_controller=CTRL, saveat=dfx.SaveAt(solver_state=True))
    with pytest.raises(ValueError, match="Regularized"):
        rd.value(stated)


def test_backsolve_adjoint_gradient_by_replay():
    """BacksolveAdjoint's gradients do not reach the solver state: ``replay`` recomputes the
    local step outside the solve and gives regnde.solve's adjoint gradient."""
    eqx = pytest.importorskip("equinox")

    class Field(eqx.Module):
        w: jax.Array

        def __call__(self, t, y, args):
            return jnp.tanh(y @ self.w.T) * 3

    wr = rd.Regularized(dfx.Tsit5(), LOCAL, key=1, span=(0.0, 3.0), rtol=TOL, atol=TOL)

    def replayed(f):
        term = dfx.ODETerm(f)
        sol = dfx.diffeqsolve(term, wr, 0.0, 3.0, 0.01, Y0, stepsize_controller=CTRL,
                              saveat=dfx.SaveAt(t1=True, solver_state=True),
                              adjoint=dfx.BacksolveAdjoint())
        return wr.replay(sol, term)

    def reference(f):
        return regnde.solve(lambda t, y: f(t, y, None), Y0, jnp.array([0.0, 3.0]),
                            backend="diffrax", method="tsit5", regularizer=LOCAL, key=1,
                            dt0=0.01, sensitivity="adjoint").reg

    f = Field(W)
    g, ref = eqx.filter_grad(replayed)(f).w, eqx.filter_grad(reference)(f).w
    assert float(jnp.abs(g).sum()) > 0
    assert jnp.allclose(g, ref, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="RecursiveCheckpointAdjoint"):
        rd.Regularized(dfx.Tsit5(), R.GlobalError()).replay(None, None)
