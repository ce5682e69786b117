"""Regularizers and samplers on torchdiffeq, and on traces of other array libraries."""

from __future__ import annotations

import functools
import math
import types
import warnings

import numpy as np
import pytest
import torch

import regnde
from regnde import engine
from regnde import regularizers as R
from regnde import samplers as S
from regnde.errors import NonFiniteError
from regnde.solvers import DOPRI5
from regnde.trace import Trace

F64 = torch.float64


class MLP(torch.nn.Module):
    """A time-dependent vector field (B, 3) -> (B, 3)."""

    def __init__(self, seed: int = 0, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = torch.nn.Linear(4, width, dtype=F64)
        self.l2 = torch.nn.Linear(width, 3, dtype=F64)

    def forward(self, t, y):
        tt = t.to(y.dtype).expand(y.shape[0], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], 1))))


@pytest.fixture
def problem():
    f = MLP()
    y0 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.0, 2.0, 4, dtype=F64)
    return f, y0, t


def grads(value, module):
    return torch.autograd.grad(value, list(module.parameters()), allow_unused=False)


def replay_global_error(f, y0, trace, rtol, atol, tab=DOPRI5):
    """sum_j E_j |dt_j| by re-running the recorded grid with plain torch (dt held fixed);
    each error belongs to the step as taken (``dt_taken``), weighted by the clipped ``dt``."""
    y = y0
    total = torch.zeros((), dtype=F64)
    for t0, dt, h in zip(trace.t, trace.dt_taken, trace.dt, strict=True):
        ks = []
        for i in range(tab.stages):
            yi = y + dt * sum(a * k for a, k in zip(tab.a[i], ks, strict=False)) if i else y
            ks.append(f(t0 + tab.c[i] * dt, yi))
        y1 = y + dt * sum(b * k for b, k in zip(tab.b, ks, strict=True))
        err = dt * sum(e * k for e, k in zip(tab.b_error, ks, strict=True))
        scale = atol + rtol * torch.maximum(y.abs(), y1.abs())
        total = total + (err / scale).pow(2).mean().sqrt() * h.abs()
        y = y1
    return total


# -- global --------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_global_error_equals_trace_sum_and_replay_gradient(problem, direction):
    f, y0, t = problem
    t = t if direction > 0 else t.flip(0)
    sol = regnde.solve(f, y0, t, rtol=1e-5, atol=1e-5, regularizer=R.GlobalError())
    tr = sol.trace
    assert tr.n_steps >= 3
    assert torch.allclose(sol.reg, (tr.error * tr.dt.abs()).sum(), rtol=1e-14, atol=0)
    replay = replay_global_error(f, y0, tr, 1e-5, 1e-5)
    assert torch.allclose(sol.reg, replay, rtol=1e-9)
    for g, h in zip(grads(sol.reg, f), grads(replay, f), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
def test_global_stiffness_reductions(problem, reduction):
    f, y0, t = problem
    sol = regnde.solve(f, y0, t, regularizer=R.GlobalStiffness(reduction=reduction))
    s = sol.trace.stiffness
    expected = {"sum": s.sum(), "mean": s.mean(), "max": s.max()}[reduction]
    assert torch.allclose(sol.reg, expected)
    assert all(g.abs().sum() > 0 for g in grads(sol.reg, f))


def test_stiffness_reference_variant_divides_by_stability_size(problem):
    f, y0, t = problem
    raw = regnde.solve(f, y0, t, method="tsit5", regularizer=R.GlobalStiffness()).reg
    ref = regnde.solve(f, y0, t, method="tsit5",
                       regularizer=R.GlobalStiffness(variant="reference")).reg
    assert torch.allclose(ref, raw / 3.5068)


# -- local ---------------------------------------------------------------------------------------
LOCALS = [
    pytest.param(lambda: R.LocalError(sampler="unbiased"), id="error-unbiased"),
    pytest.param(lambda: R.LocalError(sampler="biased"), id="error-biased"),
    pytest.param(lambda: R.LocalError(first_stage="constant", dt="initial"), id="reference"),
    pytest.param(lambda: R.LocalStiffness(sampler="unbiased"), id="stiffness-unbiased"),
    pytest.param(lambda: R.LocalStiffness(sampler="biased"), id="stiffness-biased"),
]


@pytest.mark.parametrize("make", LOCALS)
@pytest.mark.parametrize("sensitivity", ["direct", "adjoint"])
def test_local_same_key_same_value_and_gradients(problem, make, sensitivity):
    f, y0, t = problem
    a = regnde.solve(f, y0, t, sensitivity=sensitivity, regularizer=make(), key=7)
    b = regnde.solve(f, y0, t, sensitivity=sensitivity, regularizer=make(), key=7)
    c = regnde.solve(f, y0, t, sensitivity=sensitivity, regularizer=make(), key=8)
    assert a.reg.item() == b.reg.item()
    assert a.reg.item() != c.reg.item()
    assert a.stats.nfe_reg > 0
    gs = grads(a.reg, f)
    assert all(torch.isfinite(g).all() for g in gs)
    assert sum(g.abs().sum() for g in gs) > 0


def test_local_value_is_same_under_both_sensitivities(problem):
    f, y0, t = problem
    d = regnde.solve(f, y0, t, regularizer=R.LocalError(), key=3)
    a = regnde.solve(f, y0, t, sensitivity="adjoint", regularizer=R.LocalError(), key=3)
    assert torch.equal(d.ys, a.ys)
    assert d.reg.item() == a.reg.item()


class FixedTau(S.Sampler):
    name = "fixed"
    needs_trace = False

    def __init__(self, tau: float):
        self.tau = tau

    def sample(self, trace, t0, t1, key):
        return torch.as_tensor(self.tau, dtype=t0.dtype)


@pytest.mark.parametrize("first_stage", ["differentiable", "constant"])
def test_fixed_tau_gradient_equals_finite_difference(problem, first_stage):
    f, y0, t = problem
    tau = 0.77
    sol = regnde.solve(f, y0, t, regularizer=R.LocalError(sampler=FixedTau(tau),
                                                          first_stage=first_stage))
    tr = sol.trace
    dt = tr.dt[int((tr.t <= tau).sum()) - 1]
    # u(tau): an extra output time changes no step, so this is the solve's own dense output
    t_tau = torch.sort(torch.cat([t, torch.tensor([tau], dtype=F64)])).values
    u = regnde.solve(f, y0, t_tau).ys[2].detach()

    def step_value():
        st = regnde.step(f, tau, u, dt=dt)
        return st.error * dt.abs()

    assert torch.allclose(sol.reg, step_value(), rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad(sol.reg, [f.l1.weight])
    w, h = f.l1.weight, 1e-4  # the error amplifies rounding by 1/tol: keep h large
    for idx in [(0, 0), (3, 1), (7, 3)]:
        with torch.no_grad():
            w[idx] += h
            plus = step_value().item()
            w[idx] -= 2 * h
            minus = step_value().item()
            w[idx] += h
        fd = (plus - minus) / (2 * h)
        if first_stage == "differentiable":
            assert math.isclose(g[idx].item(), fd, rel_tol=1e-6, abs_tol=1e-10)
        else:  # a constant first stage is not the error's gradient (RESEARCH.md)
            assert not math.isclose(g[idx].item(), fd, rel_tol=1e-2)


def test_biased_sampler_concentrates_where_steps_are_dense():
    def f(t, y):  # fast transient in the first 5% of [0, 1]
        return torch.sin(400 * t) * torch.exp(-100 * t) * torch.ones_like(y) - 0.1 * y

    y0 = torch.ones(2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = regnde.solve(f, y0, t, rtol=1e-8, atol=1e-8)
    from regnde.adapters.torch.keys import make_key

    run = types.SimpleNamespace(trace=sol.trace, t0=t[0], t1=t[1])
    biased = [S.Biased().sample(run.trace, t[0], t[1], make_key(i)) for i in range(300)]
    unbiased = [S.Unbiased().sample(None, t[0], t[1], make_key(i)) for i in range(300)]
    frac_b = np.mean([float(x) < 0.05 for x in biased])
    frac_u = np.mean([float(x) < 0.05 for x in unbiased])
    assert frac_b > 0.5, frac_b
    assert frac_u < 0.15, frac_u
    assert all(float(x) < 1.0 for x in biased)  # never t1


def test_composition_adds_terms_with_their_keys(problem):
    f, y0, t = problem
    combo = 2.5 * R.LocalError() + 0.1 * R.GlobalStiffness()
    got = regnde.solve(f, y0, t, regularizer=combo, key=5).reg
    from regnde.adapters.torch.keys import make_key

    k = make_key(5)
    local = regnde.solve(f, y0, t, regularizer=R.LocalError(), key=k.fold(0)).reg
    stiff = regnde.solve(f, y0, t, regularizer=R.GlobalStiffness(), key=k.fold(1)).reg
    assert torch.allclose(got, 2.5 * local + 0.1 * stiff, rtol=1e-13)
    assert "2.5 * LocalError" in repr(combo)


# -- reductions on other array libraries -----------------------------------------------------------
class NumpyKey:
    def __init__(self, seed):
        self.seed = seed

    def uniform(self, like):
        return np.asarray(np.random.default_rng(self.seed).random(), dtype=np.asarray(like).dtype)

    def fold(self, i):
        return NumpyKey(self.seed * 1000 + i)


def _padded_trace(xp_asarray):
    t = xp_asarray([0.0, 0.1, 0.3, 0.7, np.inf, np.inf])
    dt = xp_asarray([0.1, 0.2, 0.4, 0.3, np.inf, np.inf])
    err = xp_asarray([0.5, 0.25, 1.0, 0.5, np.nan, np.nan])
    stiff = xp_asarray([2.0, 3.0, 5.0, 4.0, np.nan, 1e9])
    mask = xp_asarray([True, True, True, True, False, False])
    return Trace(t=t, dt=dt, mask=mask, n_steps=4, error=err, stiffness=stiff)


def _array_libraries():
    libs = [pytest.param(np.asarray, id="numpy")]
    try:
        import jax.numpy as jnp
    except ImportError:  # pragma: no cover - jax is a test dependency
        return libs
    libs.append(pytest.param(lambda x: jnp.asarray(np.asarray(x)), id="jax"))
    return libs


@pytest.mark.parametrize("asarray", _array_libraries())
def test_reductions_on_other_array_libraries(asarray):
    trace = _padded_trace(asarray)
    close = functools.partial(math.isclose, rel_tol=1e-6)  # JAX defaults to float32
    run = types.SimpleNamespace(trace=trace, t0=asarray(0.0), t1=asarray(1.0))
    err = [0.5 * 0.1, 0.25 * 0.2, 1.0 * 0.4, 0.5 * 0.3]
    assert close(float(R.GlobalError().value(run, None, {})), sum(err))
    assert close(float(R.GlobalError("mean").value(run, None, {})), sum(err) / 4)
    assert close(float(R.GlobalError("max").value(run, None, {})), 0.4)
    assert close(float(R.GlobalStiffness().value(run, None, {})), 14.0)
    assert close(float(R.GlobalStiffness("max").value(run, None, {})), 5.0)
    taus = {float(S.Biased().sample(trace, run.t0, run.t1, NumpyKey(i))) for i in range(200)}
    assert {round(x, 6) for x in taus} == {0.0, 0.1, 0.3, 0.7}
    tau = S.Unbiased().sample(None, run.t0, run.t1, NumpyKey(0))
    assert 0.0 <= float(tau) < 1.0
    assert int(R.containing_step(run, asarray(0.35))) == 2


# -- bad input -------------------------------------------------------------------------------------
def test_unknown_sampler_and_regularizer_names_list_valid_ones(problem):
    with pytest.raises(ValueError, match="biased, unbiased"):
        R.LocalError(sampler="uniform")
    f, y0, t = problem
    with pytest.raises(ValueError, match="global-error"):
        regnde.solve(f, y0, t, regularizer="globl-error")


def test_stiffness_regularizer_needs_a_stiffness_pair(problem):
    f, y0, t = problem
    for reg in (R.GlobalStiffness(), R.LocalStiffness()):
        with pytest.raises(ValueError, match="stiffness pair.*dopri5"):
            regnde.solve(f, y0, t, method="bosh3", regularizer=reg)


def test_global_regularizer_with_adjoint_points_to_local(problem):
    f, y0, t = problem
    with pytest.raises(ValueError, match="LocalError"):
        regnde.solve(f, y0, t, sensitivity="adjoint", regularizer=R.GlobalError())
    with pytest.raises(ValueError, match="sensitivity='direct'"):
        regnde.solve(f, y0, t, sensitivity="adjoint",
                     regularizer=R.LocalError(state="differentiable"))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_regularizer_names_the_step():
    trace = _padded_trace(np.asarray)
    bad = Trace(t=trace.t, dt=trace.dt, mask=trace.mask, n_steps=4,
                error=np.asarray([0.5, np.nan, 1.0, 0.5, 0.0, 0.0]))
    run = types.SimpleNamespace(trace=bad, t0=0.0, t1=1.0, nfe=0)
    plan = engine.Plan(R.GlobalError(), None, 0.0, 1.0)
    with pytest.raises(NonFiniteError, match=r"accepted step 1, t=0\.1"):
        engine.regularize(plan, run)


def test_initial_dt_with_differentiable_first_stage_warns():
    with pytest.warns(UserWarning, match="no effect"):
        R.LocalError(dt="initial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.LocalError(dt="initial", first_stage="constant")
        R.LocalError()


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match="recorded, initial|initial, recorded"):
        R.LocalError(dt="adaptive")
    with pytest.raises(ValueError, match="max, mean, sum"):
        R.GlobalError(reduction="median")
    with pytest.raises(ValueError, match="regnde.regularizers.LocalError"):
        regnde.solve(torch.nn.Identity(), torch.ones(1), torch.tensor([0.0, 1.0]),
                     regularizer=3.0)


def test_several_samples_average_their_steps(problem):
    f, y0, t = problem
    from regnde.adapters.torch.keys import make_key

    avg = regnde.solve(f, y0, t, regularizer=R.LocalError(samples=3), key=4)
    singles = [regnde.solve(f, y0, t, regularizer=R.LocalError(), key=make_key(4).fold(i)).reg
               for i in range(3)]
    assert torch.allclose(avg.reg, sum(singles) / 3, rtol=1e-13)
    one = regnde.solve(f, y0, t, regularizer=R.LocalError(), key=4)
    assert avg.stats.nfe_reg == 3 * one.stats.nfe_reg
    with pytest.raises(ValueError, match="positive int"):
        R.LocalError(samples=0)


def test_regularizers_and_samplers_compare_by_configuration():
    """Two regularizers built apart are the same one (a compiled solve cached on it is reused);
    a different configuration or weight is not; unhashable contents fall back to identity."""
    assert R.GlobalError() == R.GlobalError() and hash(R.GlobalError()) == hash(R.GlobalError())
    assert R.GlobalError() != R.GlobalError("mean") and R.GlobalError() != R.GlobalStiffness()
    assert R.LocalError("unbiased") == R.LocalError("unbiased") != R.LocalError("biased")
    assert 2.0 * R.GlobalError() + R.LocalError() == 2.0 * R.GlobalError() + R.LocalError()
    assert 2.0 * R.GlobalError() != 3.0 * R.GlobalError()
    assert R.resolve_sampler("biased") == R.resolve_sampler("biased")
    odd = R.GlobalError()
    odd.cache = torch.zeros(2)  # an array in the configuration: identity, not an error
    assert odd == odd and odd != R.GlobalError() and isinstance(hash(odd), int)
