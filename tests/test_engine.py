"""The engine (regnde/engine.py) on a fake backend: numpy arrays and a pure-Python Run."""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from regnde import engine
from regnde import regularizers as R
from regnde.errors import NonFiniteError
from regnde.trace import Stats, StepResult, Trace


class NumpyKey:
    """A :class:`regnde.backend.Key` over numpy (enough for the samplers used here)."""

    def __init__(self, seed: int):
        self.seed = seed

    def uniform(self, like):
        return np.asarray(np.random.default_rng(self.seed).random(), dtype=np.asarray(like).dtype)

    def fold(self, i: int) -> NumpyKey:
        return NumpyKey(self.seed * 1000 + i)


class FakeRun:
    """A finished solve of ``y' = -y`` from ``y(0) = 1`` on ``[0, 1]`` in four recorded steps;
    ``step`` is Heun-Euler (two evaluations, counted in ``nfe``)."""

    def __init__(self, captured=None, error=None):
        self.t0, self.t1 = np.asarray(0.0), np.asarray(1.0)
        t = np.asarray([0.0, 0.1, 0.3, 0.7])
        self.trace = Trace(t=t, dt=np.asarray([0.1, 0.2, 0.4, 0.3]),
                           mask=np.ones(4, dtype=bool), n_steps=4,
                           error=np.asarray([0.5, 0.25, 1.0, 0.5]) if error is None else error,
                           y=np.exp(-t))
        self.sensitivity, self.tableau = "direct", None
        self.captured = captured or {}
        self.nfe = 0
        self.asked: list[float] = []

    def f(self, t, y):
        self.nfe += 1
        return -y

    def state_at(self, tau, differentiable=False):
        self.asked.append(float(tau))
        return self.captured.get(id(tau), np.exp(-tau))

    def step(self, tau, y, dt, first_stage="differentiable"):
        k0 = self.f(tau, y)
        k1 = self.f(tau + dt, y + dt * k0)
        y1 = y + dt * (k0 + k1) / 2
        err = np.abs(dt * (k0 - k1) / 2) / (1e-6 + 1e-6 * max(abs(y), abs(y1)))
        return StepResult(t=tau, dt=dt, y1=y1, error=err, stiffness=None,
                          stages=np.stack([k0, k1]))

    def initial_dt(self, tau, y):
        return np.minimum(np.asarray(0.1), self.t1 - tau)


class Presampling(R.Regularizer):
    """Draws two times before the solve and reads the states there."""

    def __init__(self, states: bool = False):
        self.states = states

    def presample(self, t0, t1, key):
        return {(id(self), i): t0 + (t1 - t0) * key.fold(i).uniform(t0) for i in range(2)}

    def needs_states(self) -> bool:
        return self.states

    def value(self, run, key, presampled):
        return sum(run.state_at(tau) for tau in presampled.values())


def test_plan_without_regularizer_is_empty():
    for trace, keep in (("full", True), ("summary", False)):
        plan = engine.Plan(None, NumpyKey(0), np.asarray(0.0), np.asarray(1.0), trace)
        assert plan.presampled == {} and plan.probes == {} and plan.probe_times() == []
        assert plan.keep_states is keep
        assert engine.regularize(plan, FakeRun()) == (None, 0)


def test_plan_presamples_and_names_probes_by_id():
    reg = Presampling()
    plan = engine.Plan(reg, NumpyKey(3), np.asarray(0.0), np.asarray(2.0), "summary")
    assert len(plan.presampled) == 2
    taus = plan.probe_times()
    assert [id(t) for t in taus] == list(plan.probes) == [id(v) for v in plan.presampled.values()]
    assert all(0.0 <= float(t) < 2.0 for t in taus)
    # the same key draws the same times
    again = engine.Plan(reg, NumpyKey(3), np.asarray(0.0), np.asarray(2.0), "summary")
    assert [float(t) for t in again.probe_times()] == [float(t) for t in taus]
    # converted probes (e.g. to a solver's reversed time) keep their ids
    assert {pid: float(v) for pid, v in plan.probes_as(lambda x: -x).items()} == {
        id(t): -float(t) for t in taus}
    # captured values in probe_times order come back by id
    assert plan.captured(["a", "b"]) == {id(taus[0]): "a", id(taus[1]): "b"}


@pytest.mark.parametrize(("trace", "states", "replays", "keep"), [
    ("full", False, False, True), ("full", True, True, True), ("summary", False, False, False),
    ("summary", True, False, True), ("summary", True, True, False)])
def test_keep_states(trace, states, replays, keep):
    plan = engine.Plan(Presampling(states), NumpyKey(0), np.asarray(0.0), np.asarray(1.0),
                       trace, replays=replays)
    assert plan.keep_states is keep
    assert engine.keeps_states(Presampling(states), trace, replays) is keep


def test_regularize_uses_captured_states_and_the_plans_key():
    plan = engine.Plan(Presampling(), NumpyKey(1), np.asarray(0.0), np.asarray(1.0), "summary")
    captured = plan.captured([np.asarray(10.0), np.asarray(20.0)])
    run = FakeRun(captured)
    value, nfe_reg = engine.regularize(plan, run)
    assert float(value) == 30.0 and nfe_reg == 0
    assert run.asked == [float(t) for t in plan.probe_times()]


def test_regularize_counts_with_the_runs_counter_and_a_given_one():
    reg = R.LocalError(sampler="unbiased")
    plan = engine.Plan(reg, NumpyKey(0), np.asarray(0.0), np.asarray(1.0), "summary")
    run = FakeRun()
    run.nfe = 7  # evaluations of the solve itself are not the regularizer's
    value, nfe_reg = engine.regularize(plan, run)
    assert nfe_reg == 2 and run.nfe == 9
    (tau,) = plan.probe_times()
    assert run.asked == [float(tau)]
    assert math.isfinite(float(value)) and float(value) > 0
    # an adapter's own running count, read before and after
    calls = iter([100, 105])
    _, nfe_reg = engine.regularize(plan, FakeRun(), count=lambda: next(calls))
    assert nfe_reg == 5


def test_regularize_rejects_a_non_finite_value_naming_the_step():
    plan = engine.Plan(R.GlobalError(), NumpyKey(0), np.asarray(0.0), np.asarray(1.0), "full")
    run = FakeRun(error=np.asarray([0.5, np.nan, 1.0, 0.5]))
    with pytest.raises(NonFiniteError, match=r"GlobalError.*accepted step 1, t=0\.1"):
        engine.regularize(plan, run)


def test_check_value():
    trace = FakeRun().trace
    engine.check_value(np.asarray(1.0), R.GlobalError(), trace)
    engine.check_value(None, R.GlobalError(), trace)
    engine.check_value(np.asarray(np.inf), R.GlobalError(), trace, traced=True)  # not known
    with pytest.raises(NonFiniteError, match="regularizer's extra step"):
        engine.check_value(np.asarray(np.inf), R.GlobalError(), trace)
    with pytest.raises(NonFiniteError, match="regularizer's extra step"):
        engine.check_value(np.asarray(np.nan), R.GlobalError(), None)


def test_where_non_finite_per_sample_trace():
    bad = np.asarray([[0.1, 0.2], [0.3, np.inf]])
    trace = Trace(t=np.asarray([[0.0, 0.5], [0.0, 0.25]]), dt=np.ones((2, 2)),
                  mask=np.ones((2, 2), dtype=bool), n_steps=np.asarray([2, 2]), error=bad)
    assert engine.where_non_finite(trace) == "first at accepted step 1 of sample 1, t=0.25"


def test_solution_packs_and_takes_extras():
    stats = Stats(nfe=10, nfe_reg=2, n_steps=4, n_rejected=1)
    trace = FakeRun().trace
    sol = engine.solution(np.zeros(3), trace, stats, np.asarray(1.5), logqp="lq")
    assert sol.reg == 1.5 and sol.stats is stats and sol.trace is trace
    assert sol.logqp == "lq"  # type: ignore[attr-defined]
    assert engine.solution(np.zeros(3), None, Stats(), None).reg is None


def test_engine_is_backend_neutral():
    src = pathlib.Path(engine.__file__).read_text()
    for name in ("torchdiffeq", "torchsde", "torchode", "diffrax", "import torch",
                 "import jax", "from torch", "from jax"):
        assert name not in src, name
    code = ("import sys, regnde.engine; "
            "assert not {'torch', 'jax'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
