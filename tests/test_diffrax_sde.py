"""SDEs on the diffrax backend: ys equal diffrax's own (same terms, HalfSolver, controller and
Brownian tree), recorded step-doubling errors equal an independent recomputation, the
GlobalError gradient equals a fixed-grid replay on the same Brownian path, local regularizers
(both samplers, both sensitivities), regnde.step, and clear errors for bad input. float64.

Compilation dominates the runtime: each solve configuration compiles once and is reused."""

from __future__ import annotations

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

import regnde  # noqa: E402
from regnde import regularizers as R  # noqa: E402
from regnde.adapters.jax.sde_terms import BROWNIAN_STREAM, DEFAULT_BM_TOL  # noqa: E402

TOL = {"rtol": 1e-2, "atol": 1e-2}


class SDE(eqx.Module):
    """A small neural SDE with parameters ``w`` (2x2) and ``sigma``; diagonal or general noise
    (general: ``diag_embed`` of the diagonal one, so both have the same solution)."""

    w: jax.Array
    sigma: jax.Array
    noise_type: str = eqx.field(static=True, default="diagonal")
    sde_type: str = eqx.field(static=True, default="ito")

    def f(self, t, y):
        return jnp.tanh(y @ self.w) - 0.5 * y + 0.1 * jnp.cos(t)

    def g(self, t, y):
        g = self.sigma * jnp.tanh(y)
        return g if self.noise_type == "diagonal" else jax.vmap(jnp.diag)(g)


W = jnp.array([[-1.0, 0.4], [0.2, -0.8]])
SIGMA = jnp.asarray(0.3)
ITO = SDE(W, SIGMA)
STRAT = SDE(W, SIGMA, sde_type="stratonovich")
Y0 = jnp.array([[1.0, 0.5], [-0.3, 0.8]])
T = jnp.array([0.0, 0.3, 0.6, 1.0])
BM = dfx.VirtualBrownianTree(0.0, 1.0, 1e-5, jax.ShapeDtypeStruct(Y0.shape, jnp.float64),
                             jax.random.key(11))


class At(regnde.samplers.Sampler):
    """tau = 0.3 (an output time), drawn before the solve."""

    name = "at-0.3"
    needs_trace = False

    def sample(self, trace, t0, t1, key):
        return jnp.asarray(0.3, dtype=jnp.result_type(t0))


AT = R.LocalError(sampler=At())


def direct_terms(sde, bm):
    """The terms built by hand, as a diffrax user writes them."""
    def diffusion(t, y, args):
        if sde.noise_type == "diagonal":
            return lx.DiagonalLinearOperator(sde.g(t, y))
        g = sde.g(t, y)
        return lx.FunctionLinearOperator(lambda w: jnp.einsum("...dm,...m->...d", g, w),
                                         jax.ShapeDtypeStruct(g.shape[:-2] + g.shape[-1:],
                                                              g.dtype))
    return dfx.MultiTerm(dfx.ODETerm(lambda t, y, args: sde.f(t, y)),
                         dfx.ControlTerm(diffusion, bm))


def np_milstein(sde, t, y, dt, dw):
    """Itô Milstein for diagonal noise, ``g = sigma * tanh(y)`` (numpy, independent)."""
    w, s = np.asarray(sde.w), float(sde.sigma)
    f = np.tanh(y @ w) - 0.5 * y + 0.1 * np.cos(t)
    g = s * np.tanh(y)
    dg = s * (1 - np.tanh(y) ** 2)
    return y + f * dt + g * dw + 0.5 * g * dg * (dw**2 - dt)


def dW(bm, a, b):  # array times: python floats would recompile evaluate for every value
    return np.asarray(bm.evaluate(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)))


def step_doubling(sde, bm, t, y, dt):
    """``(y_full, y_half, error)`` of one step, as diffrax's HalfSolver and PIDController do."""
    th = t + 0.5 * (t + dt - t)
    y_mid = np_milstein(sde, t, y, th - t, dW(bm, t, th))
    y_half = np_milstein(sde, th, y_mid, t + dt - th, dW(bm, th, t + dt))
    y_full = np_milstein(sde, t, y, dt, dW(bm, t, t + dt))
    scale = TOL["atol"] + TOL["rtol"] * np.maximum(np.abs(y), np.abs(y_half))
    return y_full, y_half, float(np.sqrt(np.mean((np.abs(y_half - y_full) / scale) ** 2)))


@pytest.fixture(scope="module")
def eager():
    """One eager solve (Itô, milstein, given Brownian tree, trace='full', a local step at 0.3)
    and diffrax's own solve of the same problem."""
    sol = regnde.solve(ITO, Y0, T, backend="diffrax", method="milstein", bm=BM, regularizer=AT,
                       **TOL)
    ref = dfx.diffeqsolve(direct_terms(ITO, BM), dfx.HalfSolver(dfx.ItoMilstein()), 0.0, 1.0,
                          None, Y0, saveat=dfx.SaveAt(ts=T),
                          stepsize_controller=dfx.PIDController(**TOL))
    return sol, ref


# -- ys and the trace --------------------------------------------------------------------------
def test_ys_equal_diffeqsolve(eager):
    sol, ref = eager
    assert np.array_equal(sol.ys, ref.ys)
    n = int(sol.trace.n_steps)
    assert n == int(sol.stats.n_steps) == int(ref.stats["num_accepted_steps"]) >= 4
    assert int(sol.stats.n_rejected) == int(ref.stats["num_rejected_steps"])
    tr = sol.trace
    assert float(jnp.sum(tr.dt)) == pytest.approx(1.0, rel=1e-14)
    assert not bool(jnp.any(tr.mask[n:])) and tr.stiffness is None
    assert np.allclose(tr.t[1:n], (tr.t + tr.dt)[: n - 1], rtol=0, atol=1e-15)


def test_recorded_errors_equal_independent_step_doubling(eager):
    sol, _ = eager
    tr = sol.trace
    n = int(tr.n_steps)
    for j in range(n):
        t, dt, y = float(tr.t[j]), float(tr.dt[j]), np.asarray(tr.y[j])
        y_full, y_half, error = step_doubling(ITO, BM, t, y, dt)
        assert abs(float(tr.error[j]) - error) < 1e-10 * max(error, 1.0)
        assert float(tr.error[j]) < 1.0
        if j + 1 < n:  # the accepted state is the two half steps
            assert np.allclose(tr.y[j + 1], y_half, rtol=1e-12, atol=1e-14)
        else:  # outputs come from HalfSolver's dense output, which is the full step's
            assert np.allclose(sol.ys[-1], y_full, rtol=1e-12, atol=1e-14)


def test_local_step_reuses_the_brownian_path_and_equals_step(eager):
    sol, _ = eager
    tr = sol.trace
    j = int(np.searchsorted(np.asarray(tr.t[: int(tr.n_steps)]), 0.3, side="right")) - 1
    dt = float(tr.dt[j])
    st = regnde.step(ITO, 0.3, sol.ys[1], backend="diffrax", method="milstein", dt=dt, bm=BM,
                     **TOL)
    assert float(sol.reg) == pytest.approx(float(st.error) * dt, rel=1e-12)
    assert int(sol.stats.nfe_reg) == 3
    # the same step, recomputed independently on the same Brownian path
    y_full, y_half, error = step_doubling(ITO, BM, 0.3, np.asarray(sol.ys[1]), dt)
    assert float(st.error) == pytest.approx(error, rel=1e-10)
    assert np.allclose(st.y1, y_half, rtol=1e-12) and np.allclose(st.stages[0], y_full,
                                                                   rtol=1e-12)


# -- gradients ---------------------------------------------------------------------------------
def test_global_error_gradient_equals_fixed_grid_replay(eager):
    def value(params):
        w, sigma = params
        sol = regnde.solve(SDE(w, sigma), Y0, T, method="milstein", bm=BM, trace="summary",
                           regularizer=R.GlobalError(), **TOL)
        return sol.reg, (sol.trace.t, sol.trace.n_steps)

    (v, (ts, n)), g = jax.jit(jax.value_and_grad(value, has_aux=True))((W, SIGMA))
    tr = eager[0].trace
    assert int(n) == int(tr.n_steps) and np.array_equal(ts, tr.t)
    steps = [(float(tr.t[j]), float(tr.dt[j])) for j in range(int(n))]
    incs = [(dW(BM, t, t + 0.5 * dt), dW(BM, t + 0.5 * dt, t + dt), dW(BM, t, t + dt))
            for t, dt in steps]

    def replay(params):  # the recorded grid with constant t, dt and Brownian increments
        w, s = params

        def mil(t, y, h, dw):
            g = s * jnp.tanh(y)
            f = jnp.tanh(y @ w) - 0.5 * y + 0.1 * jnp.cos(t)
            return y + f * h + g * dw + 0.5 * g * s * (1 - jnp.tanh(y) ** 2) * (dw**2 - h)

        y, total = Y0, 0.0
        for (t, dt), (d1, d2, d) in zip(steps, incs, strict=True):
            y_half = mil(t + 0.5 * dt, mil(t, y, 0.5 * dt, d1), 0.5 * dt, d2)
            y_full = mil(t, y, dt, d)
            scale = TOL["atol"] + TOL["rtol"] * jnp.maximum(jnp.abs(y), jnp.abs(y_half))
            total = total + jnp.sqrt(jnp.mean((jnp.abs(y_half - y_full) / scale) ** 2)) * dt
            y = y_half
        return total

    rv, rg = jax.value_and_grad(replay)((W, SIGMA))
    assert float(v) == pytest.approx(float(rv), rel=1e-10)
    for a, b in zip(g, rg, strict=True):
        assert np.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1])) > 0


LOCAL = R.LocalError() + R.LocalError(sampler="biased")


@eqx.filter_jit
@eqx.filter_value_and_grad(has_aux=True)
def _local_loss(sde, key, sensitivity, method):
    sol = regnde.solve(sde, Y0, T, method=method, regularizer=LOCAL, key=key,
                       sensitivity=sensitivity, trace="summary", **TOL)
    return sol.reg, (sol.ys, sol.stats.nfe_reg)


@pytest.mark.parametrize("sensitivity,sde,method", [("direct", ITO, "milstein"),
                                                    ("adjoint", STRAT, "midpoint")])
def test_local_regularizers_gradients_and_keys(sensitivity, sde, method):
    (r, (ys, nfe_reg)), g = _local_loss(sde, jax.random.key(3), sensitivity, method)
    assert bool(jnp.isfinite(r)) and float(r) > 0 and int(nfe_reg) >= 2 * 3
    for leaf in (g.w, g.sigma):
        assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.abs(leaf).sum()) > 0
    (r2, (ys2, _)), g2 = _local_loss(sde, jax.random.key(3), sensitivity, method)
    assert float(r2) == float(r) and np.array_equal(ys, ys2) and np.array_equal(g.w, g2.w)
    (r3, (ys3, _)), _ = _local_loss(sde, jax.random.key(4), sensitivity, method)
    assert float(r3) != float(r) and not np.array_equal(ys, ys3)  # another Brownian path


def test_key_seeds_the_documented_brownian_tree():
    key = jax.random.key(5)
    bm = dfx.VirtualBrownianTree(0.3, 0.4, DEFAULT_BM_TOL * 0.1,
                                 jax.ShapeDtypeStruct(Y0.shape, jnp.float64),
                                 jax.random.fold_in(key, BROWNIAN_STREAM))
    a = regnde.step(ITO, 0.3, Y0, dt=0.1, key=key, **TOL)
    b = regnde.step(ITO, 0.3, Y0, dt=0.1, bm=bm, **TOL)
    c = regnde.step(ITO, 0.3, Y0, dt=0.1, key=6, **TOL)
    assert np.array_equal(a.y1, b.y1) and float(a.error) == float(b.error)
    assert not np.array_equal(a.y1, c.y1)
    d = regnde.step(ITO, 0.3, Y0, key=key, **TOL)  # dt=None: diffrax's 0.01 for SDEs
    assert float(d.dt) == pytest.approx(0.01)
    ge = jax.grad(lambda s: regnde.step(SDE(W, s), 0.3, Y0, dt=0.1, key=key, **TOL).error)
    assert np.isfinite(float(ge(SIGMA))) and float(ge(SIGMA)) != 0


def test_general_noise_step_equals_hand_built_terms():
    gen = SDE(W, SIGMA, noise_type="general", sde_type="stratonovich")
    bm = dfx.VirtualBrownianTree(0.0, 0.2, 1e-5, jax.ShapeDtypeStruct(Y0.shape, jnp.float64),
                                 jax.random.key(2))

    @jax.jit  # one small compile instead of many eager dispatches
    def both(y):
        st = regnde.step(gen, 0.0, y, method="heun", dt=0.2, bm=bm, **TOL)
        solver = dfx.HalfSolver(dfx.Heun())
        terms = direct_terms(gen, bm)
        y1, y_error, _, _, _ = solver.step(terms, 0.0, 0.2, y, None,
                                           solver.init(terms, 0.0, 0.2, y, None), True)
        diag = regnde.step(STRAT, 0.0, y, method="heun", dt=0.2, bm=bm, **TOL)
        return st.y1, st.stages, y1, y_error, diag.y1, st.stiffness is None

    st_y1, stages, y1, y_error, diag_y1, no_stiffness = both(Y0)
    assert np.allclose(st_y1, y1, rtol=1e-14, atol=1e-15)
    assert np.allclose(jnp.abs(stages[2] - stages[0]), y_error, rtol=1e-12, atol=1e-15)
    # general noise with diag_embed equals diagonal noise on the same path
    assert np.allclose(st_y1, diag_y1, rtol=1e-13) and no_stiffness


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"noise_type is 'weird'.*diagonal, scalar, additive"):
        regnde.solve(SDE(W, SIGMA, noise_type="weird"), Y0, T, key=0, **TOL)
    with pytest.raises(ValueError, match=r"sde_type is 'levy'"):
        regnde.solve(SDE(W, SIGMA, sde_type="levy"), Y0, T, key=0, **TOL)

    class Wide(SDE):
        def g(self, t, y):
            return jnp.ones((*y.shape, 3))  # (batch, d, m) but declared diagonal

    with pytest.raises(ValueError, match=r"diagonal noise must have the shape of y, \(2, 2\)"):
        regnde.solve(Wide(W, SIGMA), Y0, T, key=0, **TOL)
    with pytest.raises(ValueError, match=r"scalar noise must have shape \(\.\.\., d, 1\)"):
        regnde.solve(SDE(W, SIGMA, noise_type="scalar"), Y0, T, key=0, **TOL)
    with pytest.raises(ValueError, match=r"general noise must have shape \(\.\.\., d, m\)"):
        regnde.solve(_Flat(W, SIGMA, noise_type="general", sde_type="stratonovich"), Y0, T,
                     key=0, **TOL)
    for reg in (R.GlobalStiffness(), R.LocalStiffness()):
        with pytest.raises(ValueError, match=r"stiffness pair.*backend 'diffrax'.*GlobalError"):
            regnde.solve(ITO, Y0, T, regularizer=reg, key=0, **TOL)
    with pytest.raises(ValueError, match=r"unknown SDE method.*'euler'.*milstein"):
        regnde.solve(ITO, Y0, T, method="euler", key=0, **TOL)
    with pytest.raises(ValueError, match=r"'heun'.*ito SDEs.*methods that do: milstein"):
        regnde.solve(ITO, Y0, T, method="heun", key=0, **TOL)
    with pytest.raises(ValueError, match=r"unknown SDE method of backend 'diffrax' 'dopri5'"):
        regnde.solve(ITO, Y0, T, method="dopri5", key=0, **TOL)
    with pytest.raises(ValueError, match=r"BacksolveAdjoint.*Stratonovich.*milstein"):
        regnde.solve(ITO, Y0, T, sensitivity="adjoint", regularizer=R.LocalError(), key=0,
                     **TOL)
    with pytest.raises(ValueError, match=r"heun, midpoint, reversible_heun"):
        regnde.solve(STRAT, Y0, T, method="milstein", sensitivity="adjoint", key=0, **TOL)
    with pytest.raises(ValueError, match="sensitivity='direct'"):
        regnde.solve(STRAT, Y0, T, method="midpoint", sensitivity="adjoint",
                     regularizer=R.GlobalError(), key=0, **TOL)
    gen_ito = SDE(W, SIGMA, noise_type="general")
    with pytest.raises(ValueError, match=r"general noise.*Stratonovich form"):
        regnde.solve(gen_ito, Y0, T, key=0, **TOL)
    with pytest.raises(ValueError, match="forward in time only"):
        regnde.solve(ITO, Y0, T[::-1], key=0, **TOL)
    with pytest.raises(ValueError, match=r"bm has shape \(3,\)"):
        regnde.solve(ITO, Y0, T, bm=dfx.VirtualBrownianTree(0.0, 1.0, 1e-3, (3,),
                                                            jax.random.key(0)), **TOL)
    with pytest.raises(ValueError, match=r"unknown diffrax SDE option.*\['dt'\]"):
        regnde.solve(ITO, Y0, T, dt=0.1, key=0, **TOL)
    with pytest.raises(ValueError, match=r"key=None under jax\.jit"):
        jax.jit(lambda y: regnde.solve(ITO, y, T, **TOL).ys)(Y0)
    with pytest.raises(ValueError, match="first_stage='differentiable'"):
        regnde.solve(ITO, Y0, T, regularizer=R.LocalError(first_stage="constant",
                                                          dt="initial"), key=0, **TOL)
    assert regnde.methods("diffrax", sde=True) == ["euler_heun", "heun", "midpoint",
                                                   "milstein", "reversible_heun"]


class _Flat(SDE):
    def g(self, t, y):
        return y  # (batch, d) but declared general
