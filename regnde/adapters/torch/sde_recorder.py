"""What one torchsde solve records, and the Run regularizers see of it.

:class:`Recorder` collects a solve's accepted steps (in torchsde's own time, which increases)
as the recording solver classes of :mod:`regnde.adapters.torch.sde_solvers` hand them over and
builds the :class:`Trace`; :class:`SdeRun` is the :class:`regnde.backend.Run` of the finished
solve (dense output by linear interpolation, local steps by step doubling on the solve's own
solver and Brownian motion).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchsde._core import interp

from regnde.adapters.torch.common import StepLog
from regnde.adapters.torch.sde_step import step_result, with_error_gradient
from regnde.errors import MaxStepsExceeded, max_steps_exceeded
from regnde.tableau import Tableau
from regnde.trace import StepResult, Trace


# -- recording ---------------------------------------------------------------------------------
class Recorder(StepLog):
    """Collects one solve's accepted steps (in torchsde's own time, which increases)."""

    def __init__(self, solver: Any, *, max_steps: int | None, keep_states: bool, full: bool,
                 probes: Mapping[int, torch.Tensor], error_grad: bool = True):
        super().__init__()
        self.solver, self.error_grad = solver, error_grad
        self.max_steps, self.keep_states, self.full = max_steps, keep_states, full
        self.probes = dict(probes)
        self.fulls: list[torch.Tensor] = []
        self.halves: list[torch.Tensor] = []
        self.y_end: torch.Tensor | None = None
        self.t_end: torch.Tensor | None = None

    def attempt(self, t: torch.Tensor, t_end: torch.Tensor) -> None:
        self.attempts += 1
        if self.max_steps is not None and self.attempts > self.max_steps:
            raise MaxStepsExceeded(max_steps_exceeded(self.max_steps, float(t), float(t_end),
                                                      self.solver.rtol, self.solver.atol))

    def accept(self, t0: torch.Tensor, t1: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor,
               error: torch.Tensor, y_full: torch.Tensor | None = None) -> None:
        """An accepted step ``t0 -> t1`` from ``y0`` to ``y1`` (two half steps) with its error
        value; ``y_full``, the full step, makes the error differentiable."""
        self.ts.append(t0)
        self.dts.append(t1 - t0)
        self.errors.append(error)
        if self.error_grad and y_full is not None and (y1.requires_grad or y_full.requires_grad):
            self.fulls.append(y_full)
            self.halves.append(y1)
        if self.keep_states:
            self.ys.append(y0)
        for pid, tau in self.probes.items():
            if pid not in self.captured and t0 <= tau <= t1:
                self.captured[pid] = interp.linear_interp(t0=t0, y0=y0, t1=t1, y1=y1, t=tau)

    def finish(self, t_end: torch.Tensor, y_end: torch.Tensor) -> None:
        self.t_end, self.y_end = t_end, y_end

    def trace(self) -> Trace:
        n = len(self.ts)
        if n == 0:
            raise ValueError("torchsde took no step: t must span a positive interval.")
        t = torch.stack(self.ts)
        error = torch.stack(self.errors)
        if len(self.fulls) == n:
            error = with_error_gradient(error, torch.stack(self.fulls),
                                        torch.stack(self.halves), self.solver.rtol,
                                        self.solver.atol)
        self.fulls, self.halves = [], []
        return Trace(t=t, dt=torch.stack(self.dts),
                     mask=torch.ones(n, dtype=torch.bool, device=t.device), n_steps=n,
                     error=error, stiffness=None,
                     y=torch.stack(self.ys) if self.full else None)


# -- the Run regularizers see ------------------------------------------------------------------
class SdeRun:
    """The :class:`regnde.backend.Run` of a torchsde solve.

    ``tableau`` is ``None`` (step doubling has none); ``step`` reuses the solve's solver, so the
    same vector field, tolerances and Brownian motion.
    """

    tableau: Tableau | None = None

    def __init__(self, rec: Recorder, trace: Trace, t0: torch.Tensor, t1: torch.Tensor,
                 sensitivity: str, dt_option: Any):
        self.rec, self.trace, self.sensitivity = rec, trace, sensitivity
        self.t0, self.t1 = t0, t1
        self.solver = rec.solver
        self.dt_option = dt_option

    def state_at(self, tau: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """``u(tau)`` by torchsde's dense output (linear between accepted steps), ``(batch, d)``."""
        u = self.rec.captured.get(id(tau))
        if u is None:
            u = self._from_trace(tau)
        return u if differentiable else u.detach()

    def _from_trace(self, tau: torch.Tensor) -> torch.Tensor:
        rec = self.rec
        if not rec.keep_states:
            raise RuntimeError("regnde did not keep the states this regularizer needs "
                               "(please report this bug).")
        ts = self.trace.t
        j = int(torch.searchsorted(ts, tau.reshape(1).to(ts.dtype), right=True)) - 1
        j = max(0, min(j, len(rec.ts) - 1))
        t0, y0 = rec.ts[j], rec.ys[j]
        if j + 1 < len(rec.ts):
            t1, y1 = rec.ts[j + 1], rec.ys[j + 1]
        else:
            assert rec.t_end is not None and rec.y_end is not None
            t1, y1 = rec.t_end, rec.y_end
        if bool(tau == t0):
            return y0
        return interp.linear_interp(t0=t0, y0=y0, t1=t1, y1=y1, t=tau.to(t0.dtype))

    def step(self, tau: torch.Tensor, y: torch.Tensor, dt: torch.Tensor,
             first_stage: str = "differentiable") -> StepResult:
        """One step (full and two halves) from ``(tau, y)``, ending at ``min(tau + dt, t1)``."""
        if first_stage != "differentiable":
            raise ValueError(
                f"first_stage={first_stage!r} treats an RK method's first stage as a constant; "
                f"torchsde's step doubling has no such stage. Use first_stage='differentiable' "
                f"(the default) with backend 'torchsde'."
            )
        tau = tau.detach()
        end = torch.minimum(tau + torch.as_tensor(dt).to(tau).detach().abs(), self.t1)
        return step_result(self.solver, tau, end, y)

    def initial_dt(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """torchsde has no initial step selection: the ``dt`` option, clipped to ``t1 - tau``."""
        dt = torch.as_tensor(self.dt_option, dtype=tau.dtype, device=tau.device)
        return torch.minimum(dt, self.t1 - tau.detach())


