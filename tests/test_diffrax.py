"""The diffrax backend: ys equal diffrax's own, recorded errors and stiffness equal an
independent recomputation, gradients equal a fixed-grid replay, agreement with torchdiffeq,
jit/grad/vmap, keys, and clear errors for bad input. float64 throughout."""

from __future__ import annotations

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

import regnde  # noqa: E402
from regnde import regularizers as R  # noqa: E402
from regnde.adapters.jax.ode_methods import native_tableau, tableau_solver  # noqa: E402
from regnde.solvers import DOPRI5, TSIT5  # noqa: E402

RTOL = ATOL = 1e-6


class Field(eqx.Module):
    """A small time-dependent vector field with parameters ``w`` (3x3)."""

    w: jax.Array

    def __call__(self, t, y):
        return jnp.tanh(y @ self.w) + 0.3 * jnp.cos(t)


W = jnp.array([[-1.5, 0.4, 0.1], [0.2, -0.8, 0.3], [-0.1, 0.5, -2.0]])
F = Field(W)
Y0 = jnp.array([[1.0, -0.5, 0.25], [0.3, 0.2, -1.0]])
T = jnp.linspace(0.0, 2.0, 3)


def selected_dt0(f, y0, t, solver):
    """diffrax's own initial step selection (``_select_initial_step``, Hairer's algorithm) on a
    plain ``ODETerm`` in solver time ``s = d * t``, at most ``|t1 - t0|``, with the sign ``d``
    of ``t1 - t0``: the ``dt0`` regnde passes to ``diffeqsolve`` (whose own selection, handed a
    ``WrapTerm``, returns 0.01 without evaluating ``f``)."""
    from diffrax._step_size_controller.pid import _select_initial_step

    d = 1.0 if float(t[-1]) >= float(t[0]) else -1.0
    term = dfx.ODETerm(lambda s, y, a: d * f(d * s, y))
    h = _select_initial_step(term, d * t[0], y0, None, solver.func, solver.error_order(term),
                             RTOL, ATOL, dfx.PIDController(rtol=RTOL, atol=ATOL).norm)
    return d * min(float(h), abs(float(t[-1] - t[0])))


def plain(f, y0, t, solver, adjoint=None):
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda s, y, a: f(s, y)), solver, t[0], t[-1],
        selected_dt0(f, y0, t, solver), y0,
        saveat=dfx.SaveAt(ts=t), stepsize_controller=dfx.PIDController(rtol=RTOL, atol=ATOL),
        adjoint=adjoint or dfx.RecursiveCheckpointAdjoint())


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# -- an independent step from the tableau (numpy, float64) -----------------------------------
def np_step(f, tab, t, y, dt):
    y = np.asarray(y)
    k = []
    for i in range(tab.stages):
        yi = y + dt * sum((a * kj for a, kj in zip(tab.a[i], k, strict=True)), np.zeros_like(y))
        k.append(np.asarray(f(t + tab.c[i] * dt, jnp.asarray(yi))))
    y1 = y + dt * sum(b * kj for b, kj in zip(tab.b, k, strict=True))
    err = dt * sum(b * kj for b, kj in zip(tab.b_error, k, strict=True))
    scale = ATOL + RTOL * np.maximum(np.abs(y), np.abs(y1))
    error = np.sqrt(np.mean((err / scale) ** 2))
    p, q = tab.stiffness_pair
    yp = y + dt * sum((a * kj for a, kj in zip(tab.a[p], k, strict=False)), np.zeros_like(y))
    yq = y + dt * sum((a * kj for a, kj in zip(tab.a[q], k, strict=False)), np.zeros_like(y))
    stiff = np.linalg.norm(k[p] - k[q]) / np.linalg.norm(yp - yq)
    return y1, error, stiff


# -- ys and the trace ------------------------------------------------------------------------
@pytest.mark.parametrize("method,solver", [("dopri5", dfx.Dopri5()), ("tsit5", dfx.Tsit5()),
                                           ("heun", dfx.Heun())])
def test_ys_equal_diffeqsolve(method, solver):
    sol = regnde.solve(F, Y0, T, backend="diffrax", method=method, rtol=RTOL, atol=ATOL)
    ref = plain(F, Y0, T, solver)
    assert np.array_equal(sol.ys, ref.ys)
    assert int(sol.stats.n_steps) == int(ref.stats["num_accepted_steps"])
    assert int(sol.trace.n_steps) == int(sol.stats.n_steps)
    assert float(jnp.sum(sol.trace.dt)) == pytest.approx(2.0, rel=1e-14)
    assert sol.trace.y.shape == (4096, *Y0.shape) and sol.trace.mask.shape == (4096,)


def test_backwards_in_time_and_inferred_backend():
    tb = jnp.linspace(2.0, 0.0, 4)
    sol = regnde.solve(F, Y0, tb, trace="summary")  # backend inferred from JAX arrays
    ref = plain(F, Y0, tb, dfx.Dopri5())
    assert np.array_equal(sol.ys, ref.ys)
    n = int(sol.trace.n_steps)
    assert float(sol.trace.t[0]) == 2.0 and np.all(np.diff(sol.trace.t[:n]) < 0)
    assert float(jnp.sum(sol.trace.dt)) == pytest.approx(-2.0, rel=1e-14)
    assert sol.trace.y is None


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_recorded_errors_equal_recomputation(method):
    sol = regnde.solve(F, Y0, T, method=method, rtol=RTOL, atol=ATOL)
    tr = sol.trace
    tab = native_tableau(method)
    n = int(tr.n_steps)
    assert n >= 5 and not bool(jnp.any(tr.mask[n:]))
    for j in range(n):
        y1, error, stiff = np_step(F, tab, float(tr.t[j]), tr.y[j], float(tr.dt[j]))
        # err = dt * sum(b_error * k) cancels: where the scaled error is tiny its rounding is
        # ~1e-16 * |dt k| / tol, so compare absolutely there.
        assert abs(float(tr.error[j]) - error) < 1e-9 * max(error, 1e-2)
        assert rel(tr.stiffness[j], stiff) < 1e-9
        nxt = tr.y[j + 1] if j + 1 < n else sol.ys[-1]
        assert rel(nxt, y1) < 1e-12


def test_regnde_tableaus_equal_diffrax_coefficients():
    for ours in (DOPRI5, TSIT5):
        theirs = native_tableau(ours.name)
        assert np.allclose(ours.c, theirs.c, rtol=0, atol=1e-15)
        assert np.allclose(ours.b, theirs.b, rtol=0, atol=1e-15)
        assert np.allclose(ours.b_error, theirs.b_error, rtol=0, atol=1e-15)
        for a, b in zip(ours.a, theirs.a, strict=True):
            assert np.allclose(a, b, rtol=0, atol=1e-14)


def test_tsit5_tableau_runs_like_diffrax_tsit5():
    term = dfx.ODETerm(lambda s, y, a: F(s, y))
    ours, theirs = tableau_solver(TSIT5)(), dfx.Tsit5()
    out = []
    for solver in (ours, theirs):
        state = solver.init(term, 0.3, 0.45, Y0, None)
        out.append(solver.step(term, 0.3, 0.45, Y0, None, state, False))
    assert rel(out[0][0], out[1][0]) < 1e-12  # y1
    assert rel(out[0][1], out[1][1]) < 1e-9  # y_error
    # and a whole solve through the generic class (registered under another name)
    from regnde.plugins.manager import registry

    reg = registry()
    renamed = regnde.Tableau("tsit5_generic", order=5, c=TSIT5.c, a=TSIT5.a, b=TSIT5.b,
                             b_error=TSIT5.b_error, stiffness_pair=(5, 6))
    reg.tables["method"]["tsit5_generic"] = type(reg.tables["method"]["tsit5"])(
        "tsit5_generic", renamed, "test")
    try:
        a = regnde.solve(F, Y0, T, method="tsit5_generic", trace="summary")
    finally:
        del reg.tables["method"]["tsit5_generic"]
    b = plain(F, Y0, T, dfx.Tsit5())
    assert rel(a.ys[-1], b.ys[-1]) < 1e-10  # a step end: the same steps
    assert rel(a.ys, b.ys) < 1e-4  # t = 1 is interpolated: Hermite vs Tsit5's own
    assert int(a.stats.n_steps) == int(b.stats["num_accepted_steps"])


def test_third_party_tableau_not_fsal_runs_generic():
    sol = regnde.solve(F, Y0, T, method="fehlberg2", rtol=1e-5, atol=1e-5, trace="summary")
    ref = plain(F, Y0, T, dfx.Tsit5())
    assert rel(sol.ys, ref.ys) < 1e-3
    assert int(sol.stats.nfe) == 2 + 4 * int(sol.stats.n_steps + sol.stats.n_rejected)


# -- NFE and the initial step ------------------------------------------------------------------
class Counted(eqx.Module):
    """``F`` whose every real evaluation (inside the compiled solve too) adds one to ``calls``
    through ``jax.debug.callback``."""

    calls: list = eqx.field(static=True)

    def __call__(self, t, y):
        jax.debug.callback(lambda: self.calls.append(1))
        return F(t, y)


def count_nfe(t, **kw):
    f = Counted([])
    sol = regnde.solve(f, Y0, t, trace="summary", **kw)
    jax.effects_barrier()
    return sol, len(f.calls)


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
@pytest.mark.parametrize("dt0", [None, 0.05])
def test_nfe_counts_the_real_evaluations(method, dt0):
    """stats.nfe = 2 (initial step selection, without dt0) + s + (s - 1) per later attempt,
    each of them evaluated, forward and backward in time."""
    rejected = 0
    for t in (T, T[::-1]):
        opts = {} if dt0 is None else {"dt0": dt0 if t[-1] > t[0] else -dt0}
        sol, calls = count_nfe(t, method=method, rtol=RTOL, atol=ATOL, **opts)
        attempts = int(sol.stats.n_steps + sol.stats.n_rejected)
        rejected += int(sol.stats.n_rejected)
        assert int(sol.stats.nfe) == calls == (2 if dt0 is None else 0) + 1 + 6 * attempts
        assert int(sol.stats.n_steps) >= 5
        dt = float(sol.trace.dt[0])
        if dt0 is None:  # the selection, not diffeqsolve's fixed 0.01
            assert dt == pytest.approx(selected_dt0(F, Y0, t, native_solver(method)),
                                       rel=1e-12)
            assert abs(dt) != pytest.approx(0.01)
    assert rejected > 0  # rejected attempts are counted too
    sol, calls = count_nfe(T[::-1], method=method, sensitivity="adjoint")  # the forward solve
    assert int(sol.stats.nfe) == calls


def native_solver(method):
    return {"dopri5": dfx.Dopri5(), "tsit5": dfx.Tsit5()}[method]


def test_easy_problem_takes_few_steps():
    def decay(t, y):
        return -y

    y0, t = jnp.ones(1), jnp.array([0.0, 1.0])
    sol = regnde.solve(decay, y0, t, rtol=1e-3, atol=1e-3, trace="summary")
    fixed = regnde.solve(decay, y0, t, rtol=1e-3, atol=1e-3, trace="summary", dt0=0.01)
    assert float(sol.trace.dt[0]) > 0.1
    assert int(sol.stats.n_steps) < int(fixed.stats.n_steps) and int(sol.stats.n_steps) < 5
    assert int(sol.stats.n_rejected) == 0 and int(sol.stats.nfe) == 2 + 7 + 6 * (
        int(sol.stats.n_steps) - 1)
    assert float(sol.ys[-1, 0]) == pytest.approx(np.exp(-1.0), rel=1e-3)


# -- one step, both backends -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_step_agrees_with_torchdiffeq(method):
    torch = pytest.importorskip("torch")
    wt = torch.tensor(np.asarray(W))

    def ft(t, y):
        return torch.tanh(y @ wt) + 0.3 * torch.cos(t)

    t, dt = 0.7, 0.13
    a = regnde.step(F, t, Y0, backend="diffrax", method=method, dt=dt)
    b = regnde.step(ft, torch.tensor(t, dtype=torch.float64), torch.tensor(np.asarray(Y0)),
                    backend="torchdiffeq", method=method, dt=dt)
    assert rel(a.y1, b.y1.numpy()) < 1e-12
    assert rel(a.error, b.error.numpy()) < 1e-9
    assert rel(a.stiffness, b.stiffness.numpy()) < 1e-9
    assert a.stages.shape == (7, *Y0.shape)


def test_step_initial_dt_is_controllers_selection():
    from diffrax._step_size_controller.pid import _select_initial_step

    st = regnde.step(F, 0.0, Y0, method="dopri5")
    term = dfx.ODETerm(lambda s, y, a: F(s, y))
    h = _select_initial_step(term, 0.0, Y0, None, dfx.Dopri5().func, 5, RTOL, ATOL,
                             dfx.PIDController(rtol=RTOL, atol=ATOL).norm)
    assert float(st.dt) == pytest.approx(float(h), rel=1e-14)
    assert 0 < float(st.dt) < 1 and float(st.error) < 1.0
    g = jax.grad(lambda f: regnde.step(f, 0.0, Y0, dt=0.1).error)(F)
    assert bool(jnp.all(jnp.isfinite(g.w))) and float(jnp.abs(g.w).sum()) > 0


# -- gradients ---------------------------------------------------------------------------------
def replay(f, tab, tr, y0, reduction_weight):
    """Replay the recorded steps with constant t, dt in plain JAX: (R_E, R_S)."""
    n = int(tr.n_steps)
    ts, dts = np.asarray(tr.t), np.asarray(tr.dt)  # constants of the replay
    y, re, rs = y0, 0.0, 0.0
    for j in range(n):
        t, dt = float(ts[j]), float(dts[j])
        k = []
        for i in range(tab.stages):
            yi = y + dt * sum((a * kj for a, kj in zip(tab.a[i], k, strict=True)),
                              jnp.zeros_like(y))
            k.append(f(t + tab.c[i] * dt, yi))
        y1 = y + dt * sum(b * kj for b, kj in zip(tab.b, k, strict=True))
        err = dt * sum(b * kj for b, kj in zip(tab.b_error, k, strict=True))
        scale = ATOL + RTOL * jnp.maximum(jnp.abs(y), jnp.abs(y1))
        re = re + jnp.sqrt(jnp.mean((err / scale) ** 2)) * abs(dt)
        p, q = tab.stiffness_pair
        dy = dt * sum((a - b) * kj for a, b, kj in zip(
            (*tab.a[p], 0.0), (*tab.a[q], *([0.0] * (p - q))), k, strict=False))
        rs = rs + jnp.linalg.norm(k[p] - k[q]) / jnp.linalg.norm(dy)
        y = y1
    return re + reduction_weight * rs


def test_global_gradients_equal_fixed_grid_replay():
    reg = R.GlobalError() + 0.01 * R.GlobalStiffness()
    sol = regnde.solve(F, Y0, T, regularizer=reg, trace="summary")

    @jax.jit
    def value(w):
        return regnde.solve(Field(w), Y0, T, regularizer=reg, trace="summary").reg

    g = jax.grad(value)(W)
    tab = native_tableau("dopri5")
    ref = jax.jit(jax.value_and_grad(lambda w: replay(Field(w), tab, sol.trace, Y0, 0.01)))
    ref_val, g_ref = ref(W)
    assert rel(sol.reg, ref_val) < 1e-9
    assert rel(g, g_ref) < 1e-8
    assert float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize("sensitivity", ["direct", "adjoint"])
def test_local_regularizers_gradients(sensitivity):
    reg = R.LocalError() + R.LocalStiffness(sampler="biased")

    @eqx.filter_jit
    @eqx.filter_value_and_grad(has_aux=True)
    def loss(f, key):
        sol = regnde.solve(f, Y0, T, regularizer=reg, key=key, sensitivity=sensitivity,
                           trace="summary")
        return sol.reg, (sol.ys, sol.stats.nfe_reg)

    (r, (ys, nfe_reg)), g = loss(F, jax.random.key(3))
    assert bool(jnp.isfinite(r)) and float(r) > 0
    assert bool(jnp.all(jnp.isfinite(g.w))) and float(jnp.abs(g.w).sum()) > 0
    assert int(nfe_reg) >= 14  # two local steps of 7 stages (+ the biased state's step)
    adjoint = dfx.BacksolveAdjoint() if sensitivity == "adjoint" else None
    assert np.array_equal(ys, plain(F, Y0, T, dfx.Dopri5(), adjoint).ys)


def test_adjoint_gradients_with_a_closure():
    def loss(w, sensitivity):
        def f(t, y):  # closes over w: converted for BacksolveAdjoint
            return jnp.tanh(y @ w) + 0.3 * jnp.cos(t)
        return jnp.sum(regnde.solve(f, Y0, T, sensitivity=sensitivity, trace="summary").ys ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    ga, gd = grad(W, "adjoint"), grad(W, "direct")
    assert rel(ga, gd) < 1e-4 and float(jnp.abs(ga).sum()) > 0


def test_adjoint_gradients_backwards_in_time():
    def loss(f, sensitivity):
        sol = regnde.solve(f, Y0, T[::-1], sensitivity=sensitivity, trace="summary")
        return jnp.sum(sol.ys ** 2)

    ga = eqx.filter_grad(loss)(F, "adjoint")
    gd = eqx.filter_grad(loss)(F, "direct")
    assert rel(ga.w, gd.w) < 1e-4 and float(jnp.abs(ga.w).sum()) > 0


def test_same_key_same_value_eager_and_jit():
    reg = R.LocalError()
    a = regnde.solve(F, Y0, T, regularizer=reg, key=7, trace="summary").reg
    b = regnde.solve(F, Y0, T, regularizer=reg, key=7, trace="summary").reg
    c = jax.jit(lambda k: regnde.solve(F, Y0, T, regularizer=reg, key=k,
                                       trace="summary").reg)(jax.random.key(7))
    d = regnde.solve(F, Y0, T, regularizer=reg, key=8, trace="summary").reg
    assert float(a) == float(b)
    assert float(c) == pytest.approx(float(a), rel=1e-12)
    assert float(d) != float(a)


def test_vmap_gives_each_element_its_own_steps():
    ys0 = jnp.stack([Y0[0], 5.0 * Y0[1]])
    per = jax.vmap(lambda y: regnde.solve(F, y, T, trace="summary").stats.n_steps)(ys0)
    alone = [int(regnde.solve(F, y, T, trace="summary").stats.n_steps) for y in ys0]
    assert per.shape == (2,) and [int(n) for n in per] == alone and alone[0] != alone[1]


# -- errors --------------------------------------------------------------------------------------
def test_max_steps_exceeded_eager_and_jit():
    with pytest.raises(regnde.MaxStepsExceeded, match="max_steps=3"):
        regnde.solve(F, Y0, T, max_steps=3)
    with pytest.raises(Exception, match="max_steps=3") as info:
        jax.jit(lambda y: regnde.solve(F, y, T, max_steps=3, trace="summary").ys)(Y0)
    assert not isinstance(info.value, regnde.MaxStepsExceeded)  # raised at run time by equinox


def test_nan_regularizer_under_jit_is_a_runtime_error():
    class Nan(R.Regularizer):
        def value(self, run, key, presampled):
            return jnp.sum(jnp.where(run.trace.mask, run.trace.error, 0.0)) * jnp.nan

    with pytest.raises(regnde.NonFiniteError):
        regnde.solve(F, Y0, T, regularizer=Nan(), trace="summary")
    with pytest.raises(Exception, match="NaN or Inf"):
        jax.jit(lambda y: regnde.solve(F, y, T, regularizer=Nan(), trace="summary").reg)(Y0)


def test_bad_input_errors():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="takes jax arrays"):
        regnde.solve(F, torch.ones(3), torch.linspace(0, 1, 3), backend="diffrax")
    with pytest.raises(ValueError, match="dtype"):
        regnde.solve(F, Y0, T.astype(jnp.float32))
    with pytest.raises(ValueError, match="Mixed dtypes"):
        regnde.solve(lambda t, y: (y @ W).astype(jnp.float32), Y0, T)
    with pytest.raises(ValueError, match="sensitivity='direct'"):
        regnde.solve(F, Y0, T, sensitivity="adjoint", regularizer=R.GlobalError())
    with pytest.raises(ValueError, match=r"key=None under jax\.jit"):
        jax.jit(lambda y: regnde.solve(F, y, T, regularizer=R.LocalError()).reg)(Y0)
    with pytest.raises(ValueError, match="unknown diffrax option"):
        regnde.solve(F, Y0, T, first_step=0.1)
    with pytest.raises(ValueError, match="key must be"):
        regnde.solve(F, Y0, T, regularizer=R.LocalError(), key="seed")
    with pytest.raises(ValueError, match="f must take"):
        regnde.solve(lambda t, y, args: y, Y0, T)


def test_a_new_but_equal_regularizer_reuses_the_compiled_solve():
    """The regularizer is part of the compiled solve's static configuration: a fresh
    ``GlobalError()`` each training step must not compile the solve again (f is traced, i.e.
    called in Python, only when compiling)."""
    traces = []

    def f(t, y):
        traces.append(1)
        return -y

    y0, t = jnp.ones(3), jnp.array([0.0, 1.0])
    regnde.solve(f, y0, t, regularizer=R.GlobalError() + 0.5 * R.LocalError("unbiased"), key=0)
    first = len(traces)
    regnde.solve(f, y0, t, regularizer=R.GlobalError() + 0.5 * R.LocalError("unbiased"), key=1)
    assert len(traces) == first
