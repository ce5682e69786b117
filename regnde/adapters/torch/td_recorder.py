"""What one torchdiffeq solve records, and the Run regularizers see of it.

:class:`Recorder` collects a solve's accepted steps (times, step sizes, errors, stiffness,
states and the states at sampled times) as the recording solver classes of
:mod:`regnde.adapters.torch.td_solvers` hand them over, then builds the :class:`Trace` and
evaluates the regularizer on :class:`TorchRun`. :class:`Layout` says where ``y`` sits in the
state of an augmented solve. Also regnde's errors as torchdiffeq's own (``AssertionError``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchdiffeq._impl.interp import _interp_evaluate

from regnde.adapters.torch.common import StepLog
from regnde.adapters.torch.keys import TorchKey
from regnde.adapters.torch.td_tableau import Counting, rk_step, stiffness_ratio, td_misc
from regnde.engine import Plan, keeps_states, regularize
from regnde.errors import (
    MaxStepsExceeded,
    NonFiniteError,
    StepSizeUnderflow,
    dropin_not_regularized,
    max_steps_exceeded,
)
from regnde.tableau import Tableau
from regnde.trace import Stats, StepResult, Trace


# -- errors, as torchdiffeq's own ----------------------------------------------------------------
class Underflow(StepSizeUnderflow, AssertionError):
    """regnde's :class:`StepSizeUnderflow`, and torchdiffeq's own ``AssertionError``."""


class NonFinite(NonFiniteError, AssertionError):
    """regnde's :class:`NonFiniteError`; torchdiffeq fails there with an ``AssertionError``."""


class TooManySteps(MaxStepsExceeded, AssertionError):
    """regnde's :class:`MaxStepsExceeded`, and torchdiffeq's ``max_num_steps`` assertion."""


# -- recording ---------------------------------------------------------------------------------
class Layout:
    """Where ``y`` sits in torchdiffeq's flat state ``cat([y.reshape(-1), r])`` of an augmented
    solve, and the plain problem's field and norm (for local steps and dense output of ``y``).

    Args:
        shape: ``y0.shape``. f: the user's field. norm: the plain problem's error norm.
    """

    def __init__(self, shape: torch.Size, f: Any, norm: Any):
        self.shape, self.n = shape, int(np.prod(shape)) if len(shape) else 1
        self.plain = Counting(f)
        self.norm = norm

    def y(self, flat: torch.Tensor) -> torch.Tensor:
        """``(n_total,)`` -> ``y0.shape``."""
        return flat[: self.n].view(self.shape)

    def stages(self, k: torch.Tensor) -> torch.Tensor:
        """``(n_total, stages)`` -> ``(*y0.shape, stages)``."""
        return k[: self.n].reshape(*self.shape, k.shape[-1])


class Recorder(StepLog):
    """Collects one solve's accepted steps, then evaluates the regularizer on them.

    With a :class:`Layout` (an augmented solve) it records the ``y`` part only and, with
    ``defer``, evaluates the regularizer in :meth:`finish` once the integrals are known."""

    def __init__(self, solver: Any, *, regularizer: Any, key: TorchKey, sensitivity: str,
                 trace: str, max_steps: int | None, grad: bool, layout: Layout | None = None,
                 defer: bool = False, host_grads: bool = False):
        super().__init__()
        self.solver = solver
        #: the drop-in keeps torchdiffeq's own arithmetic, step sizes' gradients included
        self.host_grads = host_grads
        self.counter: Counting = solver.func
        self.regularizer, self.key, self.sensitivity = regularizer, key, sensitivity
        self.trace_mode, self.max_steps, self.grad = trace, max_steps, grad
        self.tab: Tableau = solver.regnde_tableau
        self.reversed = _is_reversed(self.counter.func)
        self.keep_states = keeps_states(regularizer, trace)
        self.stiff: list[torch.Tensor] = []
        self.plan: Plan | None = None
        self.probes: dict[int, torch.Tensor] = {}  # in solver time
        self.value: Any = None
        self.on_end: Callable[[Recorder], None] | None = None
        self.on_skip: Callable[[str, torch.Tensor], None] | None = None
        self.layout, self.defer = layout, defer
        self.integrals: dict[int, torch.Tensor] = {}
        if layout is None:
            self.func, self.norm = solver.func, solver.norm
        else:  # the plain problem in solver time, counted as the regularizer's
            plain: Any = layout.plain
            if self.reversed:
                plain = td_misc._ReverseFunc(plain, mul=-1.0)
            self.func, self.norm = td_misc._PerturbFunc(plain), layout.norm

    # user time <-> solver time
    def to_solver(self, x: torch.Tensor) -> torch.Tensor:
        return -x if self.reversed else x

    def begin(self, t: torch.Tensor) -> None:
        """``t``: the output times in solver time (increasing)."""
        self.t_end = t[-1]
        self.t0, self.t1 = t[0].detach(), t[-1].detach()
        self.presample()

    def skipped(self, why: str) -> None:
        """This solve cannot be regularized (``why``); the drop-in announces it."""
        if self.on_skip is not None:
            self.on_skip(dropin_not_regularized(why), self.solver.y0)
        self.solver = None

    def begin_event(self, t0: torch.Tensor) -> None:
        """An event solve: the end is the event time, known only at :meth:`end`; sampled times
        are drawn then, and states at them come from the recorded steps."""
        self.t0 = self.t1 = t0.detach()
        self.keep_states = True

    def presample(self) -> None:
        # the plan in user time (``to_solver`` is its own inverse), the probes in solver time
        self.plan = Plan(self.regularizer, self.key, self.to_solver(self.t0),
                         self.to_solver(self.t1), self.trace_mode)
        self.probes = self.plan.probes_as(self.to_solver)

    def attempt(self, t0: torch.Tensor) -> None:
        self.attempts += 1
        if self.max_steps is not None and self.attempts > self.max_steps:
            raise TooManySteps(max_steps_exceeded(
                self.max_steps, float(self.to_solver(t0)), float(self.to_solver(self.t1)),
                self.solver.rtol, self.solver.atol))

    def accept(self, t0: torch.Tensor, dt: torch.Tensor, y0: torch.Tensor, error: torch.Tensor,
               k: torch.Tensor, interp_coeff: list[torch.Tensor], t1: torch.Tensor) -> None:
        lay = self.layout
        if lay is not None:
            y0, k = lay.y(y0), lay.stages(k)
        self.ts.append(t0.detach())
        self.dts.append(dt.detach())
        self.errors.append(error)
        if self.keep_states:
            self.ys.append(y0 if self.trace_mode == "full" else y0.detach())
        w = self.solver.regnde_w
        if w is not None:  # divided by |dt| for all steps at once in end()
            self.stiff.append(stiffness_ratio(k, self.tab, w))
        for pid, tau in self.probes.items():
            if pid not in self.captured and t0 <= tau <= t1:
                u = _interp_evaluate(interp_coeff, t0, t1, tau)
                self.captured[pid] = u if lay is None else lay.y(u)

    def end(self, event_t: torch.Tensor | None = None) -> None:
        """The solve returned (``event_t``: an event solve's end, in solver time)."""
        if event_t is not None:
            self.t_end, self.t1 = event_t, event_t.detach()
            self.presample()
        n = len(self.ts)
        t = torch.stack(self.ts)
        taken = torch.stack(self.dts)
        dt = taken.clone()
        dt[-1] = torch.minimum(dt[-1], self.t_end - t[-1])  # the last step overshoots t1
        sign = -1.0 if self.reversed else 1.0
        self.trace = Trace(
            t=sign * t, dt=sign * dt, mask=torch.ones(n, dtype=torch.bool, device=t.device),
            n_steps=n, error=torch.stack(self.errors),
            stiffness=(torch.stack(self.stiff) / taken.abs().to(self.stiff[0].dtype)
                       if self.stiff else None),
            y=torch.stack(self.ys) if self.trace_mode == "full" else None,
            dt_taken=sign * taken,
        )
        self.stats = Stats(nfe=self.counter.n, nfe_reg=0, n_steps=n, n_rejected=self.rejected)
        if not self.defer:
            self.finish()

    def finish(self, integrals: dict[int, torch.Tensor] | None = None, nfe_reg: int = 0
               ) -> None:
        """Evaluate the regularizer (``integrals``: an augmented solve's ``r(t1)`` by owner id;
        ``nfe_reg``: its integrand evaluations), then drop the solver."""
        self.integrals = integrals or {}
        self.stats.nfe_reg = nfe_reg
        if self.regularizer is not None:
            assert self.plan is not None
            layout = self.layout

            def count() -> int:
                return self.counter.n + (layout.plain.n if layout else 0)

            with torch.set_grad_enabled(self.grad):
                self.value, spent = regularize(self.plan, TorchRun(self), count)
            self.stats.nfe_reg += spent
        self.solver = None  # drop the solver (and its graph references) once done
        if self.on_end is not None:
            self.on_end(self)


def _is_reversed(func: Any) -> bool:
    inner = getattr(func, "base_func", None)
    return isinstance(inner, td_misc._ReverseFunc)


class TorchRun:
    """The :class:`regnde.backend.Run` of a torchdiffeq solve (user's time direction)."""

    def __init__(self, rec: Recorder):
        self.rec = rec
        self.solver = rec.solver
        self.trace = rec.trace
        self.sensitivity = rec.sensitivity
        self.tableau = rec.tab
        s = -1.0 if rec.reversed else 1.0
        self.t0, self.t1 = s * rec.t0, s * rec.t1

    def state_at(self, tau: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        rec = self.rec
        u = rec.captured.get(id(tau))
        if u is None:
            u = self._from_trace(tau)
        return u if differentiable else u.detach()

    def integral(self, reg: Any) -> torch.Tensor:
        value = self.rec.integrals.get(id(reg))
        if value is None:
            raise ValueError(f"{reg!r} was not integrated along this solve (no extra state for "
                             f"it); integral regularizers need regnde.solve on torchdiffeq.")
        return value

    def _from_trace(self, tau: torch.Tensor) -> torch.Tensor:
        rec, solver = self.rec, self.solver
        tau_s = rec.to_solver(tau)
        j = int(torch.searchsorted(torch.stack(rec.ts), tau_s.reshape(1), right=True)) - 1
        j = max(0, min(j, len(rec.ts) - 1))
        y0 = rec.ys[j]
        if bool(rec.ts[j] == tau_s):
            return y0
        t0, dt = rec.ts[j], rec.dts[j]
        f0 = rec.func(t0, y0)
        y1, _, _, k = rk_step(rec.func, rec.tab, solver.tableau, y0, f0, t0, dt, solver.rtol,
                              solver.atol, rec.norm, solver.regnde_w)
        coeff = solver._interp_fit(y0, y1, k, dt)
        return _interp_evaluate(coeff, t0, t0 + dt, tau_s)

    def step(self, tau: torch.Tensor, y: torch.Tensor, dt: torch.Tensor,
             first_stage: str = "differentiable") -> StepResult:
        rec, solver = self.rec, self.solver
        tau_s, dt_s = rec.to_solver(tau).detach(), rec.to_solver(dt).detach()
        f0 = rec.func(tau_s, y)
        if first_stage == "constant":
            f0 = f0.detach()
        y1, error, stiff, k = rk_step(rec.func, rec.tab, solver.tableau, y, f0, tau_s, dt_s,
                                      solver.rtol, solver.atol, rec.norm, solver.regnde_w)
        # stages of the user's f, not of the time-reversed one torchdiffeq steps backwards with
        stages = k.movedim(-1, 0)
        return StepResult(t=tau, dt=dt, y1=y1, error=error, stiffness=stiff,
                          stages=-stages if rec.reversed else stages)

    def initial_dt(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rec, solver = self.rec, self.solver
        tau_s = rec.to_solver(tau).detach()
        h = td_misc._select_initial_step(rec.func, tau_s, y, solver.order - 1, solver.rtol,
                                          solver.atol, rec.norm).detach()
        h = torch.minimum(h.to(tau_s.dtype), rec.t1 - tau_s)
        return rec.to_solver(h)

