"""``regnde.regularize``: the drop-in around unchanged torchdiffeq calls."""

from __future__ import annotations

import threading

import pytest
import torch
import torchdiffeq

import regnde
from regnde import regularizers as R
from regnde.adapters.torch.keys import make_key

F64 = torch.float64


class Field(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16, dtype=F64), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 3, dtype=F64))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y)


@pytest.fixture
def setup():
    f = Field()
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0.0, 1.5, 3, dtype=F64)
    return f, y0, t


TOL = {"rtol": 1e-6, "atol": 1e-6}


@pytest.mark.parametrize("odeint", [torchdiffeq.odeint, torchdiffeq.odeint_adjoint])
@pytest.mark.parametrize("make", [R.LocalError, lambda: R.LocalError(sampler="biased"),
                                  lambda: R.LocalStiffness(sampler="unbiased")])
def test_same_outputs_and_same_value_as_solve(setup, odeint, make):
    f, y0, t = setup
    plain = odeint(f, y0, t, method="dopri5", **TOL)
    with regnde.regularize(make(), key=11) as reg:
        ys = odeint(f, y0, t, method="dopri5", **TOL)
    assert torch.equal(ys, plain)
    sens = "adjoint" if odeint is torchdiffeq.odeint_adjoint else "direct"
    sol = regnde.solve(f, y0, t, sensitivity=sens, regularizer=make(), key=11)
    assert reg.value.item() == sol.reg.item()
    assert reg.stats.nfe == sol.stats.nfe and reg.stats.nfe_reg == sol.stats.nfe_reg
    (loss := ys.square().mean() + reg.value).backward()
    assert all(torch.isfinite(p.grad).all() for p in f.parameters())
    del loss


def test_global_regularizer_under_odeint_adjoint_is_refused(setup):
    f, y0, t = setup
    with regnde.regularize(R.GlobalError()) as reg, pytest.raises(ValueError, match="Local"):
        torchdiffeq.odeint_adjoint(f, y0, t, **TOL)
    assert reg.value is None
    with regnde.regularize(R.GlobalError()) as reg:
        torchdiffeq.odeint(f, y0, t, **TOL)
    sol = regnde.solve(f, y0, t, regularizer=R.GlobalError())
    assert reg.value.item() == sol.reg.item()


def test_several_solves_add_up_with_derived_keys(setup):
    f, y0, t = setup
    with regnde.regularize(R.LocalError(), key=3) as reg:
        torchdiffeq.odeint(f, y0, t, **TOL)
        torchdiffeq.odeint(f, 2 * y0, t, method="tsit5", **TOL)
    key = make_key(3)
    first = regnde.solve(f, y0, t, regularizer=R.LocalError(), key=key).reg
    second = regnde.solve(f, 2 * y0, t, method="tsit5", regularizer=R.LocalError(),
                          key=key.fold(1)).reg
    assert torch.allclose(reg.value, first + second, rtol=1e-14)
    assert reg.n_solves == 2 and len(reg.traces) == 2


def test_nested_blocks_count_innermost_only(setup):
    f, y0, t = setup
    with regnde.regularize(R.LocalError(), key=1) as outer:
        torchdiffeq.odeint(f, y0, t, **TOL)
        with regnde.regularize(R.GlobalError(), key=1) as inner:
            torchdiffeq.odeint(f, y0, t, **TOL)
        after_inner = outer.value.item()
        regnde.solve(f, y0, t, regularizer=R.GlobalError())  # its own context, not outer's
    assert outer.n_solves == 1 and inner.n_solves == 1
    assert outer.value.item() == after_inner
    assert inner.value.item() == regnde.solve(f, y0, t, regularizer=R.GlobalError()).reg.item()


def test_backward_pass_solves_are_not_counted(setup):
    f, y0, t = setup
    with regnde.regularize(R.LocalError(), key=0) as reg:
        ys = torchdiffeq.odeint_adjoint(f, y0, t, **TOL)
        value = reg.value.item()
        stats = (reg.stats.nfe, reg.n_solves)
        (ys.sum() + reg.value).backward()  # runs the adjoint's backward solves
    assert reg.value.item() == value
    assert (reg.stats.nfe, reg.n_solves) == stats


def test_threads_do_not_mix_values(setup):
    f, y0, t = setup
    expected = {s: regnde.solve(f, y0 * (1 + s), t, regularizer=R.LocalError(), key=s).reg.item()
                for s in range(4)}
    results: dict[int, float] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(s):
        try:
            with regnde.regularize(R.LocalError(), key=s) as reg:
                barrier.wait(timeout=30)
                torchdiffeq.odeint(f, y0 * (1 + s), t, **TOL)
            results[s] = reg.value.item()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors
    assert results == expected


def test_outside_a_block_torchdiffeq_is_untouched(setup):
    f, y0, t = setup
    from torchdiffeq._impl.dopri5 import Dopri5Solver

    solvers = __import__("importlib").import_module("torchdiffeq._impl.odeint").SOLVERS
    with regnde.regularize(R.LocalError()):
        assert solvers["dopri5"] is not Dopri5Solver
    assert solvers["dopri5"] is Dopri5Solver
    ys = torchdiffeq.odeint(f, y0, t, **TOL)
    assert ys.shape == (3, 4, 3)


def test_bad_key_and_trace_mode():
    with pytest.raises(ValueError, match="int seed, a torch.Generator or None"):
        regnde.regularize(R.LocalError(), key="seed")
    with pytest.raises(ValueError, match="full, summary"):
        regnde.regularize(R.LocalError(), trace="everything")
