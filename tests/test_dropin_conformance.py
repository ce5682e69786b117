"""Drop-in conformance: the same torchdiffeq call, plain and inside ``regnde.regularize``.

Every case runs the host library's call twice -- once plain, once inside the block -- and
asserts what the drop-in promises: identical outputs (``torch.equal``), identical exceptions
(type and message), and a finite differentiable ``reg.value`` wherever the call can be
regularized. Where it cannot (fixed-step methods, ``scipy_solver``), the block says so once
with a warning and ``reg.value`` is a zero tensor, never ``None``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torchdiffeq

import regnde
from regnde import regularizers as R

_ODEINT = importlib.import_module("torchdiffeq._impl.odeint")

ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams",
         "fixed_adams")


class Field(torch.nn.Module):
    def __init__(self, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(3, 16, dtype=dtype, generator=g) * 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(16, 3, dtype=dtype, generator=g) * 0.5)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ self.w1 + t) @ self.w2


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    warnings: tuple[str, ...] = ()


def _run(call: Callable[[], Any]) -> Outcome:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = Outcome(value=call())
        except Exception as exc:  # compared below, type and message
            out = Outcome(error=exc)
    out.warnings = tuple(str(w.message) for w in caught)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def both(call: Callable[[], Any], regularizer: Any = None) -> tuple[Outcome, Outcome, Any]:
    """``call()`` plain, then inside a block; returns both outcomes and the block."""
    plain = _run(call)
    with regnde.regularize(regularizer if regularizer is not None else R.LocalError(),
                           key=0) as reg:
        inside = _run(call)
    return plain, inside, reg


def ours(out: Outcome) -> list[str]:
    """The warnings regnde added (the host's own are compared in :func:`assert_conforms`)."""
    return [w for w in out.warnings if w.startswith("regnde")]


def assert_conforms(plain: Outcome, inside: Outcome) -> None:
    host = [w for w in inside.warnings if not w.startswith("regnde")]
    assert host == list(plain.warnings), "the host's own warnings differ inside the block"
    if plain.error is not None:
        assert inside.error is not None, f"plain raised {plain.error!r}, the block did not"
        assert isinstance(inside.error, type(plain.error)), (
            f"plain raised {type(plain.error).__name__}, the block "
            f"{type(inside.error).__name__}: {inside.error}")
        return
    assert inside.error is None, f"the block raised {inside.error!r}; plain returned"
    assert _same(plain.value, inside.value), "outputs differ inside the block"


def problem(dtype: torch.dtype = torch.float64, reverse: bool = False, n: int = 4):
    f = Field(dtype)
    y0 = torch.randn(5, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.0, 1.2, n, dtype=dtype)
    return f, y0, (t.flip(0) if reverse else t)


# -- the matrix -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("odeint", [torchdiffeq.odeint, torchdiffeq.odeint_adjoint],
                         ids=["odeint", "adjoint"])
def test_adaptive_methods(method, dtype, reverse, odeint):
    f, y0, t = problem(dtype, reverse)
    plain, inside, reg = both(lambda: odeint(f, y0, t, method=method, rtol=1e-5, atol=1e-6))
    assert_conforms(plain, inside)
    assert isinstance(reg.value, torch.Tensor) and torch.isfinite(reg.value)
    assert reg.value.requires_grad and reg.value.item() > 0
    assert not ours(inside)


@pytest.mark.parametrize("options", [
    {"first_step": 0.05},
    {"step_t": torch.tensor([0.3, 0.7], dtype=torch.float64)},
    {"jump_t": torch.tensor([0.5], dtype=torch.float64)},
    {"norm": lambda x: x.abs().max()},
    {"dtype": torch.float64},
    {"max_num_steps": 1000},
], ids=["first_step", "step_t", "jump_t", "norm", "dtype", "max_num_steps"])
def test_adaptive_options(options):
    f, y0, t = problem()
    plain, inside, reg = both(lambda: torchdiffeq.odeint(f, y0, t, method="dopri5", rtol=1e-6,
                                                         atol=1e-6, options=dict(options)))
    assert_conforms(plain, inside)
    assert torch.isfinite(reg.value)


def test_seminorm_adjoint():
    f, y0, t = problem()
    plain, inside, reg = both(lambda: torchdiffeq.odeint_adjoint(
        f, y0, t, rtol=1e-6, atol=1e-6, adjoint_options={"norm": "seminorm"}))
    assert_conforms(plain, inside)
    assert torch.isfinite(reg.value)


@pytest.mark.parametrize("method", FIXED)
def test_fixed_step_methods_are_announced_not_regularized(method):
    f, y0, t = problem()
    plain, inside, reg = both(lambda: torchdiffeq.odeint(f, y0, t, method=method,
                                                         options={"step_size": 0.1}))
    assert_conforms(plain, inside)
    assert len(ours(inside)) == 1 and "error estimate" in ours(inside)[0]
    assert repr(method) in ours(inside)[0]
    assert isinstance(reg.value, torch.Tensor) and reg.value.item() == 0.0


def test_no_solve_in_block_gives_zero_and_a_warning():
    with pytest.warns(UserWarning, match="no .*solve ran inside the block"):
        with regnde.regularize(R.LocalError(), key=0) as reg:
            pass
    assert isinstance(reg.value, torch.Tensor) and reg.value.item() == 0.0


def test_solve_in_another_thread_is_announced():
    import threading

    f, y0, t = problem()
    with pytest.warns(UserWarning), regnde.regularize(R.LocalError(), key=0) as reg:
        th = threading.Thread(target=lambda: torchdiffeq.odeint(f, y0, t))
        th.start()
        th.join()
    assert reg.value is not None and reg.value.item() == 0.0


# -- the numbered cases ----------------------------------------------------------------


def test_single_output_time_returns_y0_as_plain():
    f, y0, _ = problem()
    t = torch.zeros(1, dtype=torch.float64)
    plain, inside, _ = both(lambda: torchdiffeq.odeint(f, y0, t))
    assert_conforms(plain, inside)


def test_no_step_limit_beyond_torchdiffeqs_own():
    def f(t, y):
        return -y + torch.sin(50 * t)

    y0 = torch.ones(2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.4], dtype=torch.float64)
    plain, inside, reg = both(lambda: torchdiffeq.odeint(f, y0, t, method="adaptive_heun",
                                                         rtol=1e-6, atol=1e-6))
    assert_conforms(plain, inside)
    assert reg.stats.n_steps > 4096


def test_event_solve():
    f, y0, _ = problem()
    t0 = torch.tensor(0.0, dtype=torch.float64)

    def event(t, y):
        return t - 0.6

    plain, inside, reg = both(lambda: torchdiffeq.odeint_event(f, y0, t0, event_fn=event,
                                                               method="dopri5"))
    assert_conforms(plain, inside)
    assert not ours(inside)  # regularized up to the event
    assert torch.isfinite(reg.value) and reg.value.item() > 0
    assert float(reg.traces[0].t[-1] + reg.traces[0].dt[-1]) == pytest.approx(0.6, abs=1e-6)


@pytest.mark.parametrize(("y0", "first_step"), [(0.5, 10.0), (1.0, 10.0), (0.5, 1e3)])
def test_non_finite_trial_steps_end_as_in_the_host(y0, first_step):
    """Overflowing trial steps: torchdiffeq rejects an infinite error and shrinks the step;
    a NaN error ends in its underflow assertion -- inside the block the same happens (regnde's
    NonFiniteError names the cause and is an AssertionError too)."""

    def f(t, y):
        return y ** 4

    y = torch.full((1,), y0, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2], dtype=torch.float64)
    plain, inside, _ = both(lambda: torchdiffeq.odeint(f, y, t,
                                                       options={"first_step": first_step}))
    assert_conforms(plain, inside)
    if inside.error is not None:
        assert isinstance(inside.error, regnde.NonFiniteError)


def test_underflow_keeps_the_host_exception_type():
    def f(t, y):
        return 1.0 / (1.0 - t).clamp_min(0.0) ** 3 * torch.ones_like(y)

    y0 = torch.ones(1, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    plain, inside, _ = both(lambda: torchdiffeq.odeint(f, y0, t))
    assert plain.error is not None
    assert_conforms(plain, inside)


def test_solver_table_restored_on_exit():
    before = dict(_ODEINT.SOLVERS)
    f, y0, t = problem()
    with regnde.regularize(R.LocalError(), key=0):
        torchdiffeq.odeint(f, y0, t, method="tsit5")
    assert _ODEINT.SOLVERS == before


def test_gradients_unchanged_when_the_value_is_not_used():
    f, y0, t = problem()
    ys = torchdiffeq.odeint(f, y0, t, rtol=1e-8, atol=1e-8)
    plain = torch.autograd.grad(ys.square().sum(), list(f.parameters()))
    with regnde.regularize(R.LocalError(), key=0):
        ys = torchdiffeq.odeint(f, y0, t, rtol=1e-8, atol=1e-8)
    inside = torch.autograd.grad(ys.square().sum(), list(f.parameters()))
    for a, b in zip(plain, inside, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# -- torchsde ------------------------------------------------------------------------------------
torchsde = pytest.importorskip("torchsde")


class SDE(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, dtype: torch.dtype = torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(2, 2, dtype=dtype, generator=g))

    def f(self, t, y):
        return torch.tanh(y @ self.w)

    def g(self, t, y):
        return 0.1 * torch.ones_like(y)


def sde_problem(dtype: torch.dtype = torch.float64):
    y0 = torch.ones(8, 2, dtype=dtype)
    ts = torch.linspace(0, 1, 4, dtype=dtype)

    def bm():
        return torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(8, 2), dtype=dtype, entropy=3,
                                         levy_area_approximation="space-time")
    return SDE(dtype), y0, ts, bm


@pytest.mark.parametrize(("method", "sdeint"), [
    ("euler", torchsde.sdeint), ("milstein", torchsde.sdeint), ("srk", torchsde.sdeint),
    ("euler", torchsde.sdeint_adjoint), ("milstein", torchsde.sdeint_adjoint),
], ids=["euler", "milstein", "srk", "euler-adjoint", "milstein-adjoint"])  # srk has no adjoint
def test_torchsde_adaptive_calls(method, sdeint):
    sde, y0, ts, bm = sde_problem()
    plain, inside, reg = both(lambda: sdeint(sde, y0, ts, method=method, adaptive=True,
                                             dt=0.05, bm=bm()))
    assert_conforms(plain, inside)
    assert not ours(inside)
    sens = "adjoint" if sdeint is torchsde.sdeint_adjoint else "direct"
    sol = regnde.solve(sde, y0, ts, backend="torchsde", method=method, adaptive=True, dt=0.05,
                       bm=bm(), regularizer=R.LocalError(), key=0, sensitivity=sens)
    assert reg.value.item() == sol.reg.item() > 0
    assert reg.stats.n_steps == sol.stats.n_steps and reg.stats.nfe > 0


def test_torchsde_fixed_step_call_is_announced():
    sde, y0, ts, bm = sde_problem()
    plain, inside, reg = both(lambda: torchsde.sdeint(sde, y0, ts, method="euler", dt=0.05,
                                                      bm=bm()))
    assert_conforms(plain, inside)
    assert len(ours(inside)) == 1 and "adaptive=True" in ours(inside)[0]
    assert reg.value.item() == 0.0


def test_torchsde_bad_call_raises_as_plain():
    sde, y0, ts, bm = sde_problem()
    plain, inside, _ = both(lambda: torchsde.sdeint(sde, y0, ts, method="no_such_method",
                                                    adaptive=True, bm=bm()))
    assert plain.error is not None
    assert_conforms(plain, inside)


def test_torchsde_gradients_unchanged_when_the_value_is_not_used():
    sde, y0, ts, bm = sde_problem()
    ys = torchsde.sdeint(sde, y0, ts, method="milstein", adaptive=True, dt=0.05, bm=bm())
    plain = torch.autograd.grad(ys.square().sum(), list(sde.parameters()))
    with regnde.regularize(R.LocalError(), key=0):
        ys = torchsde.sdeint(sde, y0, ts, method="milstein", adaptive=True, dt=0.05, bm=bm())
    inside = torch.autograd.grad(ys.square().sum(), list(sde.parameters()))
    for a, b in zip(plain, inside, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
