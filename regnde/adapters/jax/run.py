"""What a diffrax solve hands regularizers, for ODEs and SDEs alike: the :class:`DiffraxRun`
base (states at step starts replayed with the solver's own ``step``, dense output inside a
step, integrals of an augmented solve), the evaluation counts :class:`Evals`, and the
:class:`Parts` in which the ODE side (:mod:`.ode_methods`) and the SDE side
(:mod:`.sde_methods`) tell the one solve in :mod:`.diffrax` what differs between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import diffrax as dfx
import jax
import jax.numpy as jnp

from regnde.adapters.jax.common import _stop
from regnde.regularizers import containing_step
from regnde.samplers import take
from regnde.trace import StepResult, Trace


class Evals(NamedTuple):
    """Vector-field (drift) evaluations of a solver: ``init`` when its state starts, ``first``
    for the first step attempt, ``later`` for every later attempt."""

    init: int
    first: int
    later: int

    def steps(self, n: Any) -> Any:
        """Evaluations of ``n >= 1`` step attempts, the solver's ``init`` not included."""
        return self.first + (n - 1) * self.later

    def count(self, n: Any) -> Any:
        """Evaluations of a fresh solver state and ``n >= 1`` step attempts."""
        return self.init + self.steps(n)


@dataclass
class Parts:
    """What differs between an ODE and an SDE solve on diffrax (built inside the compiled
    solve by :func:`.ode_methods.ode_parts` or :func:`.sde_methods.sde_parts`).

    Attributes:
        solver: diffrax's solver (the backward solve of ``BacksolveAdjoint`` runs it).
        recording: the :class:`.common.RecordingSolver` class that wraps it.
        tab: the tableau (stiffness is recorded when it has a pair); ``None`` for SDEs.
        terms: the terms the solve runs (parameters made explicit under the adjoint).
        plain_terms: the same terms on the user's functions (for the Run and replays).
        state0: the initial state of the solve (``(y0, 0)`` when augmented).
        dt0: the first step passed to ``diffeqsolve`` (``None``: diffrax's own).
        selection: evaluations spent on choosing ``dt0``.
        evals: the solver's :class:`Evals`.
        direction: ``1`` or ``-1`` (solver time ``s = direction * t``).
        aug: the :class:`.augment.Augmented` solve of integral regularizers, or ``None``.
        make_run: ``(trace, captured, integrals) -> Run`` for the regularizer.
    """

    solver: Any
    recording: type
    tab: Any
    terms: Any
    plain_terms: Any
    state0: Any
    dt0: Any
    selection: int
    evals: Evals
    direction: Any
    aug: Any
    make_run: Callable[..., DiffraxRun]


class DiffraxRun:
    """The :class:`regnde.backend.Run` of a diffrax solve (user's time direction). Subclasses
    (:class:`.ode_methods.OdeRun`, :class:`.sde_methods.SdeRun`) add ``step`` and
    ``initial_dt``; ``state_at`` is the dense-output state captured during the solve for a
    presampled ``tau``, else the solver's dense output of the step containing ``tau``."""

    tableau: Any = None

    def __init__(self, *, trace: Trace, t0: Any, t1: Any, y0: Any, sensitivity: str,
                 terms: Any, solver: Any, controller: dfx.PIDController, evals: Evals,
                 captured: dict[int, Any], integrals: dict[int, Any] | None = None):
        self.trace, self.t0, self.t1, self.y0 = trace, t0, t1, y0
        self.sensitivity, self.terms, self.solver = sensitivity, terms, solver
        self.controller, self.evals, self.captured = controller, evals, captured
        self.integrals = integrals or {}
        self.nfe: Any = 0

    def state_at(self, tau: Any, differentiable: bool = False) -> jax.Array:
        u = self.captured.get(id(tau))
        if u is None:
            u = self._from_trace(tau, differentiable)
        return u if differentiable else jax.lax.stop_gradient(u)

    def integral(self, reg: Any) -> jax.Array:
        """``r(t1)`` of the augmented solve for the integral regularizer ``reg``."""
        value = self.integrals.get(id(reg))
        if value is None:
            raise ValueError(f"{reg!r} was not integrated along this solve.")
        return value

    def _replay(self, j: Any) -> jax.Array:
        """The state at the start of accepted step ``j``: the recorded steps replayed from
        ``y0`` with the solver's own ``step`` (forward only, a constant; ``j`` steps)."""
        tr, solver, terms = self.trace, self.solver, _stop(self.terms)
        ts, dts = jax.lax.stop_gradient(tr.t), jax.lax.stop_gradient(tr.dt)
        y0 = jax.lax.stop_gradient(self.y0)

        def body(carry: Any) -> Any:
            i, y, state = carry
            y1, _, _, state, _ = solver.step(terms, ts[i], ts[i] + dts[i], y, None, state, False)
            return i + 1, y1, state

        state = solver.init(terms, ts[0], ts[0] + dts[0], y0, None)
        _, y, _ = jax.lax.while_loop(lambda c: c[0] < j, body,
                                     (jnp.asarray(0, j.dtype), y0, state))
        self.nfe = self.nfe + jnp.where(j > 0, self.evals.count(j), 0)
        return y

    def _from_trace(self, tau: Any, differentiable: bool) -> jax.Array:
        tr = self.trace
        j = containing_step(self, tau)
        tj, dtj = take(tr.t, j), jax.lax.stop_gradient(take(tr.dt, j))
        if tr.y is not None:
            yj = jnp.take(tr.y, j, axis=0)
        elif differentiable:
            raise ValueError(
                "state='differentiable' at a time drawn after the solve (this sampler) needs "
                "the states of the solve: pass trace='full', or use state='constant'."
            )
        else:
            yj = self._replay(j)
        solver, terms = self.solver, self.terms

        def interpolate() -> Any:  # the solver's dense output of the step (fresh state)
            state = solver.init(terms, tj, tj + dtj, yj, None)
            _, _, dense, _, _ = solver.step(terms, tj, tj + dtj, yj, None, state, True)
            return solver.interpolation_cls(t0=tj, t1=tj + dtj, **dense).evaluate(tau)

        at_start = tau == tj
        self.nfe = self.nfe + jnp.where(at_start, 0, self.evals.count(1))
        return jax.lax.cond(at_start, lambda: yj, interpolate)

    def step(self, tau: Any, y: Any, dt: Any, first_stage: str = "differentiable") -> StepResult:
        raise NotImplementedError

    def initial_dt(self, tau: Any, y: Any) -> jax.Array:
        raise NotImplementedError
