"""The torchsde backend: identical outputs, step-doubling errors, gradients, bad input."""

from __future__ import annotations

import threading

import pytest
import torch
import torchsde
from torchsde._core import adaptive_stepping, base_sde

import regnde
from regnde import regularizers as R
from regnde.adapters.torch import sde_checks

F64 = torch.float64
TOL = {"rtol": 1e-3, "atol": 1e-3}


class NeuralSDE(torch.nn.Module):
    """A small neural SDE, ``(batch, 2)`` states, diagonal or general noise."""

    def __init__(self, noise_type: str = "diagonal", sde_type: str = "ito", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.noise_type, self.sde_type = noise_type, sde_type
        self.drift = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
                                         torch.nn.Linear(8, 2)).to(F64)
        self.sigma = torch.nn.Parameter(torch.tensor(0.3, dtype=F64))
        self.calls = 0

    def f(self, t, y):
        self.calls += 1
        return self.drift(y) - 0.5 * y

    def g(self, t, y):
        g = self.sigma * torch.tanh(y)
        return g if self.noise_type == "diagonal" else torch.diag_embed(g)


def make_bm(method: str | None = "srk", size=(4, 2), entropy: int = 7, t1: float = 1.0):
    return torchsde.BrownianInterval(
        t0=0.0, t1=t1, size=size, dtype=F64, entropy=entropy,
        levy_area_approximation=sde_checks.levy_area(method or "srk"))


@pytest.fixture
def problem():
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.0], [0.7, 0.1]], dtype=F64)
    t = torch.linspace(0, 1, 6, dtype=F64)
    return y0, t


def replay(sde, y0, trace, method, bm, opts=None):
    """Fixed-grid replay of the recorded steps with torchsde's own solver class and the same
    Brownian motion: ``(sum of error * |dt|, errors, states)``."""
    cls = sde_checks.ORIGINAL_SELECT(method, sde.sde_type)
    solver = cls(sde=base_sde.ForwardSDE(sde), bm=bm, dt=1e-3, adaptive=True,
                 options=dict(opts or {}), dt_min=1e-5, **TOL)
    y, extra = y0, solver.init_extra_solver_state(trace.t[0], y0)
    total, errors, states = 0.0, [], []
    for t0, dt in zip(trace.t, trace.dt, strict=True):
        states.append(y)
        y_full, _ = solver.step(t0, t0 + dt, y, extra)
        tm = 0.5 * (t0 + (t0 + dt))
        y_mid, extra_mid = solver.step(t0, tm, y, extra)
        y, extra = solver.step(tm, t0 + dt, y_mid, extra_mid)
        tol = (TOL["rtol"] * torch.max(y_full.abs(), y.abs()) + TOL["atol"]).clamp_min(1e-7)
        err = torch.sqrt((((y_full - y) / tol) ** 2).sum() / y.numel()).clamp_min(1e-7)
        expected = adaptive_stepping.compute_error(y_full, y, TOL["rtol"], TOL["atol"])
        assert float(err.detach()) == expected
        errors.append(err)
        total = total + err * dt.abs()
    return total, torch.stack(errors), torch.stack(states)


# -- identical outputs -------------------------------------------------------------------------
@pytest.mark.parametrize("method,sde_type", [(None, "ito"), ("euler", "ito"),
                                             ("milstein", "ito"), ("midpoint", "stratonovich"),
                                             ("reversible_heun", "stratonovich")])
def test_ys_identical_to_sdeint(problem, method, sde_type):
    y0, t = problem
    sde = NeuralSDE(sde_type=sde_type)
    sol = regnde.solve(sde, y0, t, method=method, bm=make_bm(method), **TOL)
    ys = torchsde.sdeint(sde, y0, t, method=method, bm=make_bm(method), adaptive=True, **TOL)
    assert torch.equal(sol.ys, ys)
    assert sol.stats.n_steps == sol.trace.n_steps >= 3


def test_ys_identical_to_sdeint_adjoint(problem):
    y0, t = problem
    sde = NeuralSDE()
    sol = regnde.solve(sde, y0, t, sensitivity="adjoint", bm=make_bm(), **TOL)
    ys = torchsde.sdeint_adjoint(sde, y0, t, bm=make_bm(), adaptive=True, **TOL)
    assert torch.equal(sol.ys, ys)
    (g1,) = torch.autograd.grad(sol.ys.sum(), [sde.sigma])
    (g2,) = torch.autograd.grad(ys.sum(), [sde.sigma])
    assert torch.equal(g1, g2)


def test_fixed_steps_pass_through(problem):
    y0, t = problem
    sde = NeuralSDE()
    sol = regnde.solve(sde, y0, t, adaptive=False, dt=0.05, bm=make_bm(), **TOL)
    ys = torchsde.sdeint(sde, y0, t, dt=0.05, bm=make_bm(), **TOL)
    assert torch.equal(sol.ys, ys)
    assert sol.trace.n_steps == 20 and torch.isnan(sol.trace.error).all()


def test_logqp_and_names_pass_through(problem):
    y0, t = problem

    class Renamed(NeuralSDE):
        def drift_fn(self, t, y):
            return self.f(t, y)

        def prior(self, t, y):
            return -y

    sde = Renamed()
    names = {"drift": "drift_fn", "prior_drift": "prior"}
    bm = {"size": (4, 3)}  # the log-ratio channel
    sol = regnde.solve(sde, y0, t, bm=make_bm(**bm), names=names, logqp=True, **TOL)
    ys, logqp = torchsde.sdeint(sde, y0, t, bm=make_bm(**bm), names=names, logqp=True,
                                adaptive=True, **TOL)
    assert torch.equal(sol.ys, ys) and torch.equal(sol.logqp, logqp)
    assert sol.stats.nfe > 0
    keyed = regnde.solve(sde, y0, t, key=1, names=names, logqp=True, **TOL)  # bm of 3 channels
    assert keyed.logqp.shape == logqp.shape


def test_extra_solver_state_passes_through(problem):
    y0, t = problem
    sde = NeuralSDE(sde_type="stratonovich")
    kw = {"method": "reversible_heun", "extra": True, **TOL}
    sol = regnde.solve(sde, y0, t, bm=make_bm("reversible_heun"), **kw)
    ys, extra = torchsde.sdeint(sde, y0, t, bm=make_bm("reversible_heun"), adaptive=True, **kw)
    assert torch.equal(sol.ys, ys)
    assert all(torch.equal(a, b) for a, b in zip(sol.extra_solver_state, extra, strict=True))


def test_float32_and_initial_dt(problem):
    y0, t = problem
    sde = NeuralSDE().float()
    with pytest.warns(UserWarning, match="dt='initial'"):
        reg = R.LocalError(dt="initial")
    sol = regnde.solve(sde, y0.float(), t.float(), key=0, regularizer=reg, dt=0.01, **TOL)
    assert sol.ys.dtype == torch.float32 and sol.trace.error.dtype == torch.float32
    assert torch.isfinite(sol.reg) and float(sol.reg.detach()) > 0


def test_nfe_counts_drift_evaluations(problem):
    y0, t = problem
    sde = NeuralSDE()
    sol = regnde.solve(sde, y0, t, bm=make_bm(), **TOL)
    assert sol.stats.nfe == sde.calls > 3 * sol.stats.n_steps


# -- the trace ---------------------------------------------------------------------------------
def test_trace_errors_equal_independent_step_doubling(problem):
    y0, t = problem
    sde = NeuralSDE()
    bm = make_bm()
    sol = regnde.solve(sde, y0, t, bm=bm, **TOL)
    tr = sol.trace
    assert tr.stiffness is None and tr.y.shape == (tr.n_steps, 4, 2)
    assert float(tr.dt.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(tr.t[-1] + tr.dt[-1]) == 1.0
    assert torch.all(tr.dt > 0) and torch.equal(tr.t[1:], (tr.t + tr.dt)[:-1])
    _, errors, states = replay(sde, y0, tr, "srk", bm)
    assert torch.equal(states, tr.y)
    assert torch.equal(errors.detach(), tr.error.detach())
    assert (tr.error <= 1).all() and tr.error.requires_grad


def test_global_error_gradient_equals_fixed_grid_replay(problem):
    y0, t = problem
    sde = NeuralSDE(sde_type="stratonovich")
    bm = make_bm("midpoint")
    sol = regnde.solve(sde, y0, t, method="midpoint", bm=bm, regularizer=R.GlobalError(), **TOL)
    params = list(sde.parameters())
    grads = torch.autograd.grad(sol.reg, params)
    total, _, _ = replay(sde, y0, sol.trace, "midpoint", bm)
    expected = torch.autograd.grad(total, params)
    assert float(sol.reg) == pytest.approx(float(total), rel=1e-12)
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("sensitivity", ["direct", "adjoint"])
@pytest.mark.parametrize("sampler", ["unbiased", "biased"])
def test_local_error_gradients(problem, sensitivity, sampler):
    y0, t = problem
    sde = NeuralSDE()
    sol = regnde.solve(sde, y0, t, sensitivity=sensitivity, key=3, trace="summary",
                       regularizer=R.LocalError(sampler=sampler), **TOL)
    assert sol.trace.y is None and sol.stats.nfe_reg > 0
    grads = torch.autograd.grad(sol.reg, list(sde.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    again = regnde.solve(sde, y0, t, sensitivity=sensitivity, key=3, trace="summary",
                         regularizer=R.LocalError(sampler=sampler), **TOL)
    assert torch.equal(sol.reg, again.reg) and torch.equal(sol.ys, again.ys)


def test_local_step_reuses_brownian_motion_and_equals_step(problem):
    y0, t = problem
    sde = NeuralSDE()
    bm = make_bm()

    class At(regnde.samplers.Sampler):
        name = "fixed"
        needs_trace = False

        def sample(self, trace, t0, t1, key):
            return torch.tensor(0.3, dtype=F64)

    reg = R.LocalError(sampler=At())
    sol = regnde.solve(sde, y0, t, bm=bm, regularizer=reg, **TOL)
    tr = sol.trace
    j = int(torch.searchsorted(tr.t, torch.tensor([0.3], dtype=F64), right=True)) - 1
    u = tr.y[j] + (0.3 - tr.t[j]) / tr.dt[j] * ((tr.y[j + 1] if j + 1 < tr.n_steps else
                                                 sol.ys[-1]) - tr.y[j])
    dt = min(float(tr.dt[j]), 0.7)
    st = regnde.step(sde, 0.3, u.detach(), dt=dt, bm=bm, **TOL)
    assert float(sol.reg) == pytest.approx(float(st.error) * float(tr.dt[j]), rel=1e-10)


def test_step_is_one_step_doubling(problem):
    y0, _ = problem
    sde = NeuralSDE()
    st = regnde.step(sde, 0.0, y0, dt=0.1, key=0, **TOL)
    y_full, _, y_half = st.stages
    assert torch.equal(st.y1, y_half) and st.stiffness is None
    assert float(st.error) == adaptive_stepping.compute_error(y_full, y_half, 1e-3, 1e-3)
    (g,) = torch.autograd.grad(st.error, [sde.sigma])
    assert torch.isfinite(g) and float(g) != 0
    again = regnde.step(sde, 0.0, y0, dt=None, key=0, **TOL)
    assert float(again.dt) == pytest.approx(1e-3)  # torchsde's dt option


def test_same_key_same_path_other_key_other_path(problem):
    y0, t = problem
    sde = NeuralSDE()
    a = regnde.solve(sde, y0, t, key=5, **TOL)
    b = regnde.solve(sde, y0, t, key=5, **TOL)
    c = regnde.solve(sde, y0, t, key=6, **TOL)
    assert torch.equal(a.ys, b.ys) and not torch.equal(a.ys, c.ys)


def test_recording_is_scoped(problem):
    y0, t = problem
    sde = NeuralSDE()
    regnde.solve(sde, y0, t, key=0, **TOL)
    from torchsde._core import methods

    assert methods.select is sde_checks.ORIGINAL_SELECT
    seen = []

    def other():  # a plain torchsde call in another thread during a regnde solve
        seen.append(torchsde.sdeint(sde, y0, t, bm=make_bm(), adaptive=True, **TOL))

    class Slow(NeuralSDE):
        def f(self, t_, y):
            if not seen and not hasattr(self, "_started"):
                self._started = threading.Thread(target=other)
                self._started.start()
                self._started.join()
            return super().f(t_, y)

    sol = regnde.solve(Slow(), y0, t, bm=make_bm(), **TOL)
    alone = regnde.solve(NeuralSDE(), y0, t, bm=make_bm(), **TOL)
    assert len(seen) == 1 and torch.equal(seen[0], alone.ys)
    assert torch.equal(sol.trace.t, alone.trace.t) and torch.equal(sol.ys, alone.ys)
    assert methods.select is sde_checks.ORIGINAL_SELECT


# -- bad input ---------------------------------------------------------------------------------
def test_method_without_the_noise_type(problem):
    y0, t = problem
    with pytest.raises(ValueError, match=r"'milstein'.*general noise.*methods that do: euler"):
        regnde.solve(NeuralSDE(noise_type="general"), y0, t, method="milstein", key=0, **TOL)
    with pytest.raises(ValueError, match=r"'euler'.*stratonovich.*midpoint"):
        regnde.solve(NeuralSDE(sde_type="stratonovich"), y0, t, method="euler", key=0, **TOL)


def test_methods_refusing_the_adjoint(problem):
    y0, t = problem
    with pytest.raises(ValueError, match=r"'srk' refuses the adjoint SDE.*euler.*milstein"):
        regnde.solve(NeuralSDE(), y0, t, sensitivity="adjoint", adjoint_method="srk", key=0,
                     **TOL)
    with pytest.raises(ValueError, match=r"reversible_heun.*adjoint_method="):
        regnde.solve(NeuralSDE(sde_type="stratonovich"), y0, t, method="reversible_heun",
                     sensitivity="adjoint", key=0, **TOL)
    with pytest.raises(ValueError, match=r"unknown method.*'adjoint_reversible_heun'.*srk"):
        regnde.solve(NeuralSDE(), y0, t, method="adjoint_reversible_heun", key=0, **TOL)


def test_diffusion_of_the_wrong_shape(problem):
    y0, t = problem

    class Bad(NeuralSDE):
        def g(self, t_, y):
            return torch.diag_embed(y)  # (batch, d, d) but declared diagonal

    with pytest.raises(ValueError, match=r"diagonal noise must have the shape of y.*\(4, 2\)"):
        regnde.solve(Bad(), y0, t, key=0, **TOL)
    scalar = r"scalar noise must have shape \(batch, d, 1\).*\(4, 2, 2\)"
    with pytest.raises(ValueError, match=scalar):
        regnde.solve(NeuralSDE(noise_type="scalar"), y0, t, key=0, method="euler", **TOL)

    class Flat(NeuralSDE):
        def g(self, t_, y):
            return y  # (batch, d) but declared general

    with pytest.raises(ValueError, match=r"general noise must have shape \(batch, d, m\)"):
        regnde.solve(Flat(noise_type="general"), y0, t, key=0, **TOL)


def test_error_regularizers_need_adaptive(problem):
    y0, t = problem
    for reg in (R.GlobalError(), R.LocalError(), 0.5 * R.LocalError(sampler="biased")):
        with pytest.raises(ValueError, match="adaptive=True"):
            regnde.solve(NeuralSDE(), y0, t, adaptive=False, regularizer=reg, key=0, **TOL)


def test_stiffness_regularizers_raise(problem):
    y0, t = problem
    for reg in (R.GlobalStiffness(), R.LocalStiffness()):
        with pytest.raises(ValueError, match=r"stiffness pair.*backend 'torchsde'.*GlobalError"):
            regnde.solve(NeuralSDE(), y0, t, regularizer=reg, key=0, **TOL)


def test_other_bad_input(problem):
    y0, t = problem
    sde = NeuralSDE()
    with pytest.raises(regnde.MaxStepsExceeded, match="max_steps=5"):
        regnde.solve(sde, y0, t, max_steps=5, key=0, **TOL)
    with pytest.raises(ValueError, match=r"unknown torchsde option.*\['rtl'\]"):
        regnde.solve(sde, y0, t, rtl=1e-3, key=0)
    with pytest.raises(ValueError, match="need sensitivity='adjoint'"):
        regnde.solve(sde, y0, t, adjoint_method="euler", key=0)
    with pytest.raises(ValueError, match="forward in time"):
        regnde.solve(sde, y0, t.flip(0), key=0, **TOL)
    with pytest.raises(ValueError, match=r"shape \(batch, d\)"):
        regnde.solve(sde, y0[0], t, key=0, **TOL)
    with pytest.raises(ValueError, match="first_stage='differentiable'"):
        regnde.solve(sde, y0, t, key=0, regularizer=R.LocalError(first_stage="constant",
                                                                 dt="initial"), **TOL)
