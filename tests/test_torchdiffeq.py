"""The torchdiffeq backend: identical outputs, recorded steps recomputed independently, gradients
against a fixed-grid replay, stiffness, counts, the adjoint, max_steps, trace modes, one step."""

from __future__ import annotations

import time

import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS as TD_SOLVERS

import regnde
from regnde.regularizers import GlobalError, LocalError

from .helpers import (
    ALL_METHODS,
    F64,
    MLP,
    TORCHDIFFEQ_METHODS,
    Linear,
    adaptive_solve,
    full_last_dt,
    heun_euler,
    plugin_module,
    replay,
    rk_from_tableau,
    rk_of,
    rk_step,
    times,
    y0_for,
)

RTOL = ATOL = 1e-6
DIRECTIONS = {"forwards": 1, "backwards": -1}
#: Shampine's stiffness pairs (0-based stages with equal c): Dormand–Prince 5 and Tsitouras 5
#: stages 6 and 7, DOP853 its last two stages (both at c = 1).
STIFFNESS_PAIRS = {"dopri5": (5, 6), "tsit5": (5, 6), "dopri8": (12, 13)}


def _params(f: torch.nn.Module) -> list[torch.Tensor]:
    return list(f.parameters())


# -- identical outputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
@pytest.mark.parametrize("sensitivity", ["direct", "adjoint"])
@pytest.mark.parametrize("method", TORCHDIFFEQ_METHODS)
def test_ys_identical_to_torchdiffeq(method: str, sensitivity: str, direction: int) -> None:
    f, y0, t = MLP(), y0_for(), times(direction)
    run = torchdiffeq.odeint if sensitivity == "direct" else torchdiffeq.odeint_adjoint
    ref = run(f, y0, t, rtol=RTOL, atol=ATOL, method=TORCHDIFFEQ_METHODS[method])
    sol = regnde.solve(f, y0, t, method=method, rtol=RTOL, atol=ATOL, sensitivity=sensitivity)
    assert sol.ys.shape == (len(t), *y0.shape)
    assert torch.equal(sol.ys, ref)
    # torchdiffeq's own solver table is restored after the solve.
    assert TD_SOLVERS[TORCHDIFFEQ_METHODS[method]].__module__.startswith("torchdiffeq.")


@pytest.mark.parametrize("sensitivity", ["direct", "adjoint"])
def test_gradients_match_torchdiffeq(sensitivity: str) -> None:
    f, t = MLP(), times(1)
    y0 = y0_for().requires_grad_()
    run = torchdiffeq.odeint if sensitivity == "direct" else torchdiffeq.odeint_adjoint
    ref = torch.autograd.grad(run(f, y0, t, rtol=RTOL, atol=ATOL).square().sum(),
                              [y0, *_params(f)])
    sol = regnde.solve(f, y0, t, rtol=RTOL, atol=ATOL, sensitivity=sensitivity)
    got = torch.autograd.grad(sol.ys.square().sum(), [y0, *_params(f)])
    for a, b in zip(got, ref, strict=True):
        if sensitivity == "adjoint":  # the backward solve is torchdiffeq's own
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        else:  # step sizes are constants in regnde, torchdiffeq lets the first carry a gradient
            assert float((a - b).norm()) <= 1e-5 * float(b.norm())


def test_tsit5_accuracy_on_exponential_decay() -> None:
    f = Linear(-1.0)
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    for t in (torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=F64),
              torch.tensor([2.0, 1.0, 0.0], dtype=F64)):
        sol = regnde.solve(f, y0, t, method="tsit5", rtol=1e-10, atol=1e-10)
        tr = sol.trace
        assert tr.n_steps > 10
        # at the step points: the method's own accuracy
        at_steps = y0 * torch.exp(-(tr.t - t[0]))[:, None]
        assert (tr.y - at_steps).abs().max() < 1e-9
        # outputs between steps come from cubic Hermite interpolation: O(dt^4)
        exact = y0 * torch.exp(-(t - t[0]))[:, None]
        assert (sol.ys - exact).abs().max() < 1e-7
    # a 5th-order method: tightening the tolerance by 1e5 costs about 1e5 ** (1/5) = 10x steps
    loose = regnde.solve(f, y0, torch.tensor([0.0, 4.0], dtype=F64), method="tsit5",
                         rtol=1e-4, atol=1e-4).stats.n_steps
    tight = regnde.solve(f, y0, torch.tensor([0.0, 4.0], dtype=F64), method="tsit5",
                         rtol=1e-9, atol=1e-9).stats.n_steps
    assert 4 <= tight / loose <= 25


@pytest.fixture
def heun_euler_registry(registry: regnde.plugins.Registry) -> regnde.plugins.Registry:
    def regnde_register_solvers(register):
        register(heun_euler())

    plugin = plugin_module("heun_euler_plugin", regnde_register_solvers=regnde_register_solvers)
    registry.add(plugin, name="heun_euler_plugin")
    return registry


def test_registered_non_fsal_tableau_matches_hand_written_solver(heun_euler_registry) -> None:
    f, y0 = MLP(), y0_for()
    t_out = [0.0, 0.4, 1.0]
    sol = regnde.solve(f, y0, torch.tensor(t_out, dtype=F64), method="heun_euler",
                       rtol=1e-4, atol=1e-4)
    f.n = 0
    ref = adaptive_solve(f, rk_from_tableau(heun_euler()), y0, t_out, 1e-4, 1e-4)
    steps = ref["steps"]
    tr = sol.trace
    assert tr.n_steps == len(steps["t"]) > 5
    torch.testing.assert_close(tr.t, torch.tensor(steps["t"], dtype=F64), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(tr.dt, torch.tensor(steps["dt"], dtype=F64), rtol=1e-10,
                               atol=1e-14)
    torch.testing.assert_close(tr.y, torch.stack(steps["y"]), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(tr.error, torch.tensor(steps["error"], dtype=F64), rtol=1e-8,
                               atol=1e-12)
    # outputs between steps: cubic Hermite from f(t0, y0) and f(t1, y1)
    torch.testing.assert_close(sol.ys, ref["ys"], rtol=1e-10, atol=1e-13)
    # one evaluation more per accepted step than an FSAL method: f(t1, y1)
    assert sol.stats.n_rejected == ref["rejected"]
    assert sol.stats.nfe == f.n == 2 + (tr.n_steps + ref["rejected"]) + tr.n_steps


# -- recorded steps, recomputed -------------------------------------------------------------------
def _close(recorded: torch.Tensor, mine: torch.Tensor) -> None:
    recorded, mine = recorded.detach(), mine.detach()
    assert abs(float(recorded) - float(mine)) <= 1e-6 * abs(float(mine)) + 1e-9, (
        float(recorded), float(mine))


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
@pytest.mark.parametrize("method", [*ALL_METHODS, "adaptive_heun"])
def test_recorded_steps_match_independent_recomputation(method: str, direction: int) -> None:
    f, y0, t = MLP(), y0_for(), times(direction)
    sol = regnde.solve(f, y0, t, method=method, rtol=RTOL, atol=ATOL)
    tr = sol.trace
    assert sol.stats.n_rejected == 0  # so that the last step's full dt is the proposed one
    n = tr.n_steps
    assert n >= 2 and tr.t.shape == tr.dt.shape == tr.error.shape == (n,)
    assert tr.y.shape == (n, *y0.shape)
    assert bool(tr.mask.all()) and tr.mask.shape == (n,)
    # steps tile [t0, t1] in the direction of t
    assert float(tr.t[0]) == float(t[0])
    assert bool((tr.dt * direction > 0).all())
    assert abs(float(tr.dt.sum()) - float(t[-1] - t[0])) < 1e-12
    torch.testing.assert_close(tr.t[1:], tr.t[:-1] + tr.dt[:-1], rtol=0, atol=1e-14)
    assert torch.equal(tr.y[0], y0)

    rk = rk_of(method)
    mine = replay(f, rk, tr, RTOL, ATOL, last_dt=full_last_dt(tr, rk.order))
    for j in range(n):
        _close(tr.error[j], mine["error"][j])
        if j + 1 < n:
            torch.testing.assert_close(tr.y[j + 1], mine["y1"][j], rtol=1e-10, atol=1e-12)
    # the last step overshoots t1 and is clipped in dt; its error is the full step's
    assert abs(full_last_dt(tr, rk.order)) > abs(float(tr.dt[-1]))

    if method in STIFFNESS_PAIRS:
        p, q = STIFFNESS_PAIRS[method]
        assert tr.stiffness is not None and tr.stiffness.shape == (n,)
        for j in range(n):
            ks = mine["ks"][j]
            dt = tr.dt[j] if j + 1 < n else full_last_dt(tr, rk.order)
            # Y_p - Y_q = dt * sum_i (a_pi - a_qi) k_i (no cancellation between two states)
            m = max(p, q)
            w = [x - y for x, y in zip(rk.a[p] + [0.0] * (m - p), rk.a[q] + [0.0] * (m - q),
                                       strict=True)]
            dy = sum(dt * wi * k for wi, k in zip(w, ks[:m], strict=True))
            dk = (ks[p] - ks[q]).norm()
            # k_p - k_q cancels (both stages approximate f(t1, y1)): rounding in the stages
            # limits the estimate's relative accuracy to about eps * |k| / |k_p - k_q|
            rel = max(1e-6, 1e-13 * float((ks[p].norm() / dk).detach()))
            est = float((dk / dy.norm()).detach())
            got = float(tr.stiffness[j].detach())
            assert abs(got - est) <= rel * est, (j, got, est)
    else:
        assert tr.stiffness is None


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_stiffness_of_linear_decay_is_its_eigenvalue(method: str) -> None:
    f = Linear(-50.0)
    y0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64)
    sol = regnde.solve(f, y0, torch.tensor([0.0, 0.5], dtype=F64), method=method,
                       rtol=1e-6, atol=1e-8)
    s = sol.trace.stiffness
    assert s.shape == (sol.trace.n_steps,) and sol.trace.n_steps > 5
    torch.testing.assert_close(s, torch.full_like(s, 50.0), rtol=1e-8, atol=0)


# -- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "direction"),
                         [("dopri5", 1), ("dopri5", -1), ("tsit5", 1), ("bosh3", 1), ("heun", 1)])
def test_gradient_of_global_error_matches_fixed_grid_replay(method: str, direction: int) -> None:
    f, t = MLP(), times(direction)
    y0 = y0_for().requires_grad_()
    wrt = [y0, *_params(f)]
    sol = regnde.solve(f, y0, t, method=method, rtol=RTOL, atol=ATOL)
    tr = sol.trace
    assert sol.stats.n_rejected == 0 and tr.n_steps >= 3
    assert not tr.dt.requires_grad
    loss = (tr.error * tr.dt).sum()
    got = torch.autograd.grad(loss, wrt)

    rk = rk_of(method)
    mine = replay(f, rk, tr, RTOL, ATOL, chain=True, y0=y0, last_dt=full_last_dt(tr, rk.order))
    ref_loss = sum(e * dt for e, dt in zip(mine["error"], tr.dt.detach(), strict=True))
    want = torch.autograd.grad(ref_loss, wrt)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=0)
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # the regularizer computes the same scalar and gradient
    reg = regnde.solve(f, y0, t, method=method, rtol=RTOL, atol=ATOL,
                       regularizer=GlobalError()).reg
    torch.testing.assert_close(reg, loss.abs(), rtol=1e-12, atol=0)


# -- counts ---------------------------------------------------------------------------------------
def _evals_per_attempt(method: str) -> tuple[int, int]:
    """(evaluations per attempted step, extra evaluations per accepted step)."""
    rk = rk_of(method)
    tab = regnde.plugins.registry().tableaus().get(method)
    extra = 1 if (not rk.reuse_last and not tab.fsal) else 0
    return len(rk.c) - 1, extra


@pytest.mark.parametrize("method", [*ALL_METHODS, "adaptive_heun"])
def test_nfe_and_step_counts(method: str) -> None:
    f, y0, t = MLP(), y0_for(), times(1)
    sol = regnde.solve(f, y0, t, method=method, rtol=RTOL, atol=ATOL)
    st, tr = sol.stats, sol.trace
    assert st.nfe == f.n and st.nfe_reg == 0
    assert st.n_steps == tr.n_steps == len(tr.t) == len(tr.error)
    per, extra = _evals_per_attempt(method)
    # f(t0, y0) and one more for the initial step selection, then the stages of every attempt
    assert st.nfe == 2 + per * (st.n_steps + st.n_rejected) + extra * st.n_steps


def test_nfe_with_a_regularizer_adds_up() -> None:
    f, y0, t = MLP(), y0_for(), times(1)
    sol = regnde.solve(f, y0, t, rtol=RTOL, atol=ATOL, regularizer=LocalError(), key=0)
    assert sol.stats.nfe_reg > 0
    assert sol.stats.nfe + sol.stats.nfe_reg == f.n
    plain = regnde.solve(MLP(), y0, t, rtol=RTOL, atol=ATOL)
    assert sol.stats.nfe == plain.stats.nfe


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_rejections_are_counted(method: str) -> None:
    f = Linear(-1.0)
    sol = regnde.solve(f, torch.ones(2, dtype=F64), torch.tensor([0.0, 10.0], dtype=F64),
                       method=method, rtol=1e-8, atol=1e-8, first_step=2.0)
    st = sol.stats
    assert st.n_rejected > 0
    assert st.n_steps == sol.trace.n_steps == len(sol.trace.t)
    per, extra = _evals_per_attempt(method)
    # with first_step given there is no initial step selection: only f(t0, y0)
    assert st.nfe == f.n == 1 + per * (st.n_steps + st.n_rejected) + extra * st.n_steps
    # only accepted steps are recorded: they still tile the interval
    assert abs(float(sol.trace.dt.sum()) - 10.0) < 1e-12
    assert bool((sol.trace.error <= 1).all())


# -- the adjoint ----------------------------------------------------------------------------------
def test_adjoint_backward_does_not_pollute_the_forward_trace() -> None:
    f, y0, t = MLP(), y0_for(), times(1)
    direct = regnde.solve(f, y0, t, rtol=RTOL, atol=ATOL)
    f.n = 0
    adj = regnde.solve(f, y0, t, rtol=RTOL, atol=ATOL, sensitivity="adjoint")
    assert adj.stats.nfe == f.n == direct.stats.nfe
    assert adj.stats.n_steps == direct.stats.n_steps == adj.trace.n_steps
    assert torch.equal(adj.trace.t, direct.trace.t)
    assert torch.equal(adj.trace.dt, direct.trace.dt)
    torch.testing.assert_close(adj.trace.error, direct.trace.error, rtol=1e-14, atol=0)

    snapshot = {k: getattr(adj.trace, k).detach().clone() for k in ("t", "dt", "error", "y")}
    stats = (adj.stats.nfe, adj.stats.nfe_reg, adj.stats.n_steps, adj.stats.n_rejected)
    before = f.n
    adj.ys.square().sum().backward()
    assert f.n > before  # the backward solve ran
    assert all(p.grad is not None for p in f.parameters())
    for k, v in snapshot.items():
        assert torch.equal(getattr(adj.trace, k), v), k
    assert (adj.stats.nfe, adj.stats.nfe_reg, adj.stats.n_steps, adj.stats.n_rejected) == stats
    # and a later solve is unaffected
    again = regnde.solve(f, y0, t, rtol=RTOL, atol=ATOL, sensitivity="adjoint")
    assert again.stats.nfe == direct.stats.nfe and again.trace.n_steps == direct.trace.n_steps


# -- max_steps ------------------------------------------------------------------------------------
def test_max_steps_counts_every_step_of_the_whole_solve() -> None:
    f, y0 = MLP(), y0_for()
    t = torch.linspace(0.0, 3.0, 25, dtype=F64)
    sol = regnde.solve(f, y0, t, rtol=1e-8, atol=1e-8)
    total = sol.stats.n_steps + sol.stats.n_rejected
    # steps per output interval are far fewer than the total
    per_interval = torch.bucketize(sol.trace.t, t, right=True).bincount().max()
    assert int(per_interval) < total - 1
    assert regnde.solve(f, y0, t, rtol=1e-8, atol=1e-8, max_steps=total).stats.n_steps == \
        sol.stats.n_steps
    with pytest.raises(regnde.MaxStepsExceeded, match=rf"max_steps={total - 1}\b") as info:
        regnde.solve(f, y0, t, rtol=1e-8, atol=1e-8, max_steps=total - 1)
    msg = str(info.value)
    assert "accepted and rejected" in msg and "raise max_steps" in msg
    assert isinstance(info.value, regnde.SolverError)


def test_max_steps_message_backwards_in_time() -> None:
    with pytest.raises(regnde.MaxStepsExceeded) as info:
        regnde.solve(MLP(), y0_for(), torch.tensor([2.0, 0.5], dtype=F64), rtol=1e-9,
                     atol=1e-9, max_steps=2)
    msg = str(info.value)
    assert "t_end=0.5;" in msg
    t_reached = float(msg.split("reached t=")[1].split(" ")[0])
    assert 0.5 < t_reached < 2.0


def test_max_steps_counts_rejected_steps() -> None:
    f = Linear(-1.0)
    kw = dict(rtol=1e-8, atol=1e-8, first_step=2.0)
    t = torch.tensor([0.0, 10.0], dtype=F64)
    sol = regnde.solve(f, torch.ones(1, dtype=F64), t, **kw)
    assert sol.stats.n_rejected > 0
    with pytest.raises(regnde.MaxStepsExceeded):
        regnde.solve(f, torch.ones(1, dtype=F64), t, max_steps=sol.stats.n_steps, **kw)


def test_max_steps_stops_a_stiff_solve_quickly() -> None:
    f = Linear(-1e7)
    start = time.perf_counter()
    with pytest.raises(regnde.MaxStepsExceeded, match="max_steps=50"):
        regnde.solve(f, torch.ones(3, dtype=F64), torch.tensor([0.0, 1e3], dtype=F64),
                     max_steps=50)
    assert f.n <= 2 + 6 * 50
    assert time.perf_counter() - start < 5


# -- trace modes ----------------------------------------------------------------------------------
def test_summary_trace_keeps_everything_but_states() -> None:
    f, y0, t = MLP(), y0_for(), times(1)
    full = regnde.solve(f, y0, t, rtol=RTOL, atol=ATOL)
    summ = regnde.solve(f, y0, t, rtol=RTOL, atol=ATOL, trace="summary")
    assert full.trace.y is not None and summ.trace.y is None
    for k in ("t", "dt", "error", "stiffness", "mask"):
        assert torch.equal(getattr(summ.trace, k), getattr(full.trace, k)), k
    assert summ.trace.n_steps == full.trace.n_steps
    assert torch.equal(summ.ys, full.ys)


# -- one step -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [*ALL_METHODS, "adaptive_heun"])
def test_step_reproduces_the_first_step_of_a_solve(method: str) -> None:
    f = MLP()
    y = y0_for(seed=5)
    t0 = 0.3
    sol = regnde.solve(f, y, torch.tensor([t0, 3.0], dtype=F64), method=method, rtol=RTOL,
                       atol=ATOL)
    tr = sol.trace
    assert tr.n_steps >= 2 and float(tr.t[1]) == float(tr.t[0] + tr.dt[0])  # accepted first try
    st = regnde.step(f, t0, y, method=method, rtol=RTOL, atol=ATOL)
    assert float(st.t) == t0
    assert torch.equal(st.dt, tr.dt[0])
    assert torch.equal(st.y1, tr.y[1])
    assert torch.equal(st.error, tr.error[0])
    if tr.stiffness is None:
        assert st.stiffness is None
    else:
        assert torch.equal(st.stiffness, tr.stiffness[0])
    # torchdiffeq's own first accepted step from there, seen through its public callback
    accepted = []
    f.callback_accept_step = lambda t0, y0, dt: accepted.append((t0, dt))
    # registered tableaus (tsit5) are torchdiffeq methods only inside a regnde context
    with regnde.regularize(LocalError(), key=0):
        torchdiffeq.odeint(f, y, torch.tensor([t0, 3.0], dtype=F64), rtol=RTOL, atol=ATOL,
                           method=TORCHDIFFEQ_METHODS.get(method, method))
    del f.callback_accept_step
    assert float(accepted[0][0]) == t0 and torch.equal(accepted[0][1], st.dt)
    rk = rk_of(method)
    assert st.stages.shape == (len(rk.c), *y.shape)
    # stage derivatives from the independent implementation
    _, ks, _, _ = rk_step(f, rk, torch.tensor(t0, dtype=F64), y, st.dt)
    torch.testing.assert_close(st.stages, torch.stack(ks), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_step_with_a_given_dt_matches_the_recorded_step(direction: int) -> None:
    f, y0, t = MLP(), y0_for(), times(direction)
    tr = regnde.solve(f, y0, t, rtol=RTOL, atol=ATOL).trace
    rk = rk_of("dopri5")
    for j in range(tr.n_steps - 1):
        st = regnde.step(f, tr.t[j], tr.y[j], dt=tr.dt[j], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(st.error, tr.error[j], rtol=1e-10, atol=0)
        torch.testing.assert_close(st.y1, tr.y[j + 1], rtol=1e-12, atol=1e-14)
        assert torch.equal(st.dt, tr.dt[j])
        # stages are k_i = f(t + c_i dt, Y_i) of the user's f, in either direction
        _, ks, _, _ = rk_step(f, rk, tr.t[j], tr.y[j], tr.dt[j])
        torch.testing.assert_close(st.stages, torch.stack(ks), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(st.stages[0], f(tr.t[j], tr.y[j]), rtol=0, atol=1e-15)
    # differentiable w.r.t. y and f's parameters
    y = y0.clone().requires_grad_()
    st = regnde.step(f, 0.0, y, dt=0.1)
    grads = torch.autograd.grad(st.error, [y, *_params(f)])
    assert all(float(g.abs().max()) > 0 for g in grads)
