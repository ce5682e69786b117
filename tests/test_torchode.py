"""The torchode backend: torchode's own ys and per-sample steps, regularizers with gradients,
local steps against an independent Dormand–Prince step, bad input."""

from __future__ import annotations

import pytest
import torch

torchode = pytest.importorskip("torchode")

import regnde  # noqa: E402
from regnde import regularizers as R  # noqa: E402
from regnde.adapters.torch import torchode as adapter  # noqa: E402
from regnde.errors import MaxStepsExceeded  # noqa: E402

F64 = torch.float64


class Field(torch.nn.Module):
    """A small time-dependent field on ``(batch, 2)``; ``t`` is ``(batch,)`` (torchode's)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 2)).to(F64)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y) * (1 + 0.5 * torch.sin(3 * t))[:, None] - 0.3 * y


def problem(batch: int = 5, backward: bool = False, seed: int = 0):
    torch.manual_seed(seed + 1)
    y0 = 2 * torch.randn(batch, 2, dtype=F64)
    t = torch.linspace(0.0, 2.0, 4, dtype=F64)
    return Field(seed), y0, (t.flip(0) if backward else t)


class Capture(R.Regularizer):
    """Keeps the Run a solve hands to its regularizer."""

    def value(self, run, key, presampled):
        self.run = run
        return run.trace.error.sum() * 0


# -- the solve is torchode's -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
@pytest.mark.parametrize("backward", [False, True])
def test_ys_and_steps_match_plain_torchode(method: str, backward: bool) -> None:
    f, y0, t = problem(backward=backward)
    sol = regnde.solve(f, y0, t, backend="torchode", method=method)
    term = torchode.ODETerm(f)
    ctrl = torchode.IntegralController(atol=1e-6, rtol=1e-6, term=term)  # regnde's defaults
    ref = torchode.solve_ivp(term, y0, t, method=method, controller=ctrl)
    assert (ref.status == 0).all()
    assert sol.ys.shape == (len(t), *y0.shape)
    torch.testing.assert_close(sol.ys, ref.ys.transpose(0, 1), rtol=0, atol=1e-10)
    accepted, taken = ref.stats["n_accepted"], ref.stats["n_steps"]
    assert torch.equal(sol.stats.n_steps, accepted)
    assert torch.equal(sol.stats.n_rejected, taken - accepted)
    assert len(set(accepted.tolist())) > 1, "samples should step differently"
    assert sol.stats.nfe == int(ref.stats["n_f_evals"].sum())  # calls x rows
    tr = sol.trace
    assert tr.t.shape == tr.dt.shape == tr.error.shape == tr.mask.shape
    assert torch.equal(tr.mask.sum(1), accepted) and torch.equal(tr.n_steps, accepted)
    assert tr.y is not None and tr.y.shape == (*tr.t.shape, 2)
    for b, n in enumerate(accepted.tolist()):  # contiguous steps from t0 to t1, each accepted
        ts, dts = tr.t[b, :n], tr.dt[b, :n]
        torch.testing.assert_close(ts[1:], ts[:-1] + dts[:-1], rtol=0, atol=1e-14)
        torch.testing.assert_close(ts[-1] + dts[-1], t[-1], rtol=0, atol=1e-12)
        assert bool(((dts > 0) == (not backward)).all())
        assert bool((tr.error[b, :n] < 1).all()) and bool((tr.error[b, n:] == 0).all())
        torch.testing.assert_close(tr.y[b, 0], y0[b])


def test_features_of_any_shape_and_summary_trace() -> None:
    def f(t, y):
        return -y * (1 + t[:, None, None])

    y0 = torch.randn(3, 2, 2, dtype=F64)
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    sol = regnde.solve(f, y0, t, backend="torchode", trace="summary")
    torch.testing.assert_close(sol.ys[-1], y0 * torch.exp(torch.tensor(-1.5)), rtol=1e-5,
                               atol=1e-6)
    assert sol.trace.y is None


# -- regularizers ---------------------------------------------------------------------------------
REGULARIZERS = [
    R.GlobalError(), R.GlobalError("mean"), R.GlobalError("max"), R.GlobalStiffness(),
    R.LocalError("unbiased"), R.LocalError("biased"), R.LocalStiffness(),
    R.LocalError(dt="initial", first_stage="constant"),
    R.LocalError(state="differentiable", samples=2),
]


@pytest.mark.parametrize("reg", REGULARIZERS, ids=repr)
@pytest.mark.parametrize("trace", ["full", "summary"])
def test_regularizers_finite_with_gradients(reg: R.Regularizer, trace: str) -> None:
    f, y0, t = problem()
    sol = regnde.solve(f, y0, t, backend="torchode", regularizer=reg, key=7, trace=trace)
    assert sol.reg is not None and sol.reg.ndim == 0 and bool(torch.isfinite(sol.reg))
    assert float(sol.reg.detach()) > 0
    grads = torch.autograd.grad(sol.reg, list(f.parameters()))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    if isinstance(reg, (R.LocalError, R.LocalStiffness)):
        assert sol.stats.nfe_reg >= 7 * y0.shape[0]  # one step of 7 stages per sample
    else:
        assert sol.stats.nfe_reg == 0


def test_global_error_is_the_mean_of_per_sample_sums() -> None:
    f, y0, t = problem()
    sol = regnde.solve(f, y0, t, backend="torchode", regularizer=R.GlobalError())
    tr = sol.trace
    per_sample = [(tr.error[b, :n] * tr.dt[b, :n].abs()).sum()
                  for b, n in enumerate(tr.n_steps.tolist())]
    torch.testing.assert_close(sol.reg, torch.stack(per_sample).mean(), rtol=1e-14, atol=0)


def test_state_at_replays_dense_output() -> None:
    f, y0, t = problem()
    cap = Capture()
    regnde.solve(f, y0, t, backend="torchode", regularizer=cap)
    tau = torch.tensor(0.77, dtype=F64)
    u = cap.run.state_at(tau)
    assert u.shape == y0.shape and not u.requires_grad
    # torchode's own dense output at tau: an extra output time leaves the steps unchanged
    t_eval = torch.sort(torch.cat([t, tau[None]])).values
    ref = torchode.solve_ivp(f, y0, t_eval, method="dopri5",
                             controller=torchode.IntegralController(1e-6, 1e-6))
    torch.testing.assert_close(u, ref.ys[:, 2], rtol=0, atol=1e-12)
    starts = cap.run.trace.t[:, 1]  # one step start per sample: the recorded states
    torch.testing.assert_close(cap.run.state_at(starts), cap.run.trace.y[:, 1], rtol=0, atol=0)


def test_presampled_state_is_recorded_during_the_solve() -> None:
    f, y0, t = problem()
    cap = Capture()
    sol = regnde.solve(f, y0, t, backend="torchode", key=3,
                       regularizer=R.LocalError("unbiased") + 0.0 * cap)
    rec = cap.run.rec
    (tau,) = rec.presampled.values()
    u = rec.captured[id(tau)]
    assert bool(rec.found[id(tau)].all())
    torch.testing.assert_close(u, cap.run._from_trace(tau.expand(y0.shape[0])), rtol=0,
                               atol=1e-12)
    assert sol.reg is not None and float(sol.reg.detach()) > 0


# -- the local step --------------------------------------------------------------------------------
DOPRI5_C = [0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1]
DOPRI5_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
            [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
            [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
            [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
DOPRI5_B = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0]
#: the embedded weights torchode (and torchdiffeq, and regnde's registered dopri5) use: their
#: error b - b_low is 2/3 of the textbook DP5(4) error b - b_hat (b_hat = 5179/57600, ...)
DOPRI5_B_LOW = [1951 / 21600, 0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60]


def dopri5_step(f, t, y, dt, rtol, atol):
    """An independent Dormand–Prince step per sample, with the RMS-scaled error."""
    k = []
    for c, row in zip(DOPRI5_C, DOPRI5_A, strict=True):
        yi = y + dt[:, None] * sum((a * kj for a, kj in zip(row, k, strict=False)),
                                   torch.zeros_like(y))
        k.append(f(t + c * dt, yi))
    y1 = y + dt[:, None] * sum(b * kj for b, kj in zip(DOPRI5_B, k, strict=True))
    # y1 - y1_low from the weight differences (subtracting the states would cancel digits)
    b_err = [b - bl for b, bl in zip(DOPRI5_B, DOPRI5_B_LOW, strict=True)]
    err = dt[:, None] * sum(e * kj for e, kj in zip(b_err, k, strict=True))
    scale = atol + rtol * torch.maximum(y.abs(), y1.abs())
    error = (err.abs() / scale).pow(2).mean(-1).sqrt()
    return y1, error, torch.stack(k)


@pytest.mark.parametrize("backward", [False, True])
def test_run_step_equals_an_independent_dopri5_step(backward: bool) -> None:
    tol = 2.0**-20  # exact in float32, where torchode keeps its tolerances
    f, y0, t = problem(backward=backward)
    cap = Capture()
    regnde.solve(f, y0, t, backend="torchode", regularizer=cap, rtol=tol, atol=tol)
    torch.manual_seed(5)
    tau = torch.rand(y0.shape[0], dtype=F64) * 1.5
    y = torch.randn_like(y0)
    dt = (0.05 + 0.1 * torch.rand(y0.shape[0], dtype=F64)) * (-1 if backward else 1)
    st = cap.run.step(tau, y, dt)
    with torch.no_grad():
        y1, error, k = dopri5_step(f, tau, y, dt, tol, tol)
    torch.testing.assert_close(st.y1, y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(st.error, error, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.stages, k, rtol=0, atol=1e-12)
    # and through regnde.step, the public one-step API
    one = regnde.step(f, tau, y, backend="torchode", dt=dt, rtol=tol, atol=tol)
    torch.testing.assert_close(one.y1, y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(one.error, error, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_run_step_reproduces_the_recorded_errors(method: str) -> None:
    f, y0, t = problem()
    cap = Capture()
    sol = regnde.solve(f, y0, t, backend="torchode", method=method, regularizer=cap)
    tr = sol.trace
    for j in range(int(tr.n_steps.min())):
        st = cap.run.step(tr.t[:, j], tr.y[:, j], tr.dt[:, j])
        torch.testing.assert_close(st.error, tr.error[:, j], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(st.stiffness, tr.stiffness[:, j], rtol=1e-10, atol=1e-12)


def test_tableaus_are_torchodes_and_valid() -> None:
    tab = adapter.native_tableau("dopri5")
    assert tab.stiffness_pair == (5, 6) and tab.fsal and tab.order == 5
    assert tab.b == pytest.approx(DOPRI5_B, abs=1e-15)
    assert tab.b_error == pytest.approx([b - bl for b, bl in zip(DOPRI5_B, DOPRI5_B_LOW,
                                                                 strict=True)], abs=1e-15)
    registered = regnde.plugins.registry().tableaus()["dopri5"]
    assert tab.b_error == pytest.approx(registered.b_error, abs=1e-15)
    assert adapter.native_tableau("tsit5").stiffness_pair == (5, 6)
    assert regnde.methods("torchode") == ["dopri5", "tsit5"]


# -- bad input -----------------------------------------------------------------------------------
def test_unknown_method_names_the_allowed_ones() -> None:
    f, y0, t = problem()
    with pytest.raises(ValueError, match="dopri5") as info:
        regnde.solve(f, y0, t, backend="torchode", method="bosh3")
    assert "tsit5" in str(info.value)
    with pytest.raises(ValueError, match="tsit5"):
        adapter.TorchodeBackend()._method("rk4")


def test_bad_input_is_refused() -> None:
    f, y0, t = problem()
    with pytest.raises(ValueError, match=r"\(batch, \*features\)"):
        regnde.solve(f, y0[0], t, backend="torchode")
    with pytest.raises(ValueError, match="unknown torchode option"):
        regnde.solve(f, y0, t, backend="torchode", first_step=0.1)
    with pytest.raises(ValueError, match="sensitivity"):
        regnde.solve(f, y0, t, backend="torchode", sensitivity="adjoint")
    with pytest.raises(ValueError, match="extra state"):
        regnde.solve(f, y0, t, backend="torchode", regularizer=R.KineticEnergy())
    with pytest.raises(ValueError, match="shape"):
        regnde.solve(lambda t, y: y[:, :1], y0, t, backend="torchode")
    with pytest.raises(MaxStepsExceeded):
        regnde.solve(f, y0, t, backend="torchode", max_steps=3)


def test_options_reach_torchode() -> None:
    f, y0, t = problem()
    pid = {"pcoeff": 0.2, "icoeff": 0.5, "dcoeff": 0.0}
    sol = regnde.solve(f, y0, t, backend="torchode", method="tsit5", rtol=1e-7, atol=1e-7,
                       **pid)
    ref = torchode.solve_ivp(f, y0, t, method="tsit5")  # torchode's default: this PID, 1e-7
    torch.testing.assert_close(sol.ys, ref.ys.transpose(0, 1), rtol=0, atol=1e-10)
    assert torch.equal(sol.stats.n_steps, ref.stats["n_accepted"])
