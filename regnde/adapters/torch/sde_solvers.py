"""The solver classes regnde runs torchsde's methods with, and their installation.

torchsde has no solver registry (``methods.select`` is an if-chain), so while a regnde solve or
drop-in block is open :data:`SCOPE` patches ``torchsde._core.methods.select`` to return a
recording subclass of torchsde's own solver class: its ``integrate`` is upstream's loop
(:func:`_recorded_integrate`) plus recording, with the same arithmetic and the same Brownian
queries in the same order. Inside a drop-in block a :class:`DropinRecorder` evaluates the
block's regularizer when the solve ends.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import torch
from torchsde._core import adaptive_stepping, interp

from regnde.adapters.torch.dropin import Block, register_scope
from regnde.adapters.torch.keys import TorchKey
from regnde.adapters.torch.scope import RecordingScope, called_from
from regnde.adapters.torch.sde_checks import ORIGINAL_SELECT, only_local, ts_adjoint, ts_methods
from regnde.adapters.torch.sde_recorder import Recorder, SdeRun
from regnde.adapters.torch.sde_step import scaled_error
from regnde.engine import Plan, keeps_states, regularize
from regnde.errors import NonFiniteError, dropin_not_regularized, dropin_other_thread, non_finite_f
from regnde.trace import Stats


def _recorded_integrate(solver: Any, rec: Recorder, y0: torch.Tensor, ts: torch.Tensor,
                        extra0: Any) -> tuple[torch.Tensor, Any]:
    # Upstream torchsde._core.base_solver.BaseSDESolver.integrate (base_solver.py:92-149) plus
    # recording. Keep the arithmetic and the Brownian queries identical: ys must equal torchsde's.
    step_size = solver.dt

    prev_t = curr_t = ts[0]
    prev_y = curr_y = y0
    curr_extra = extra0

    ys = [y0]
    prev_error_ratio = None
    nan = torch.full((), math.nan, dtype=y0.dtype, device=y0.device)

    for out_t in ts[1:]:
        while curr_t < out_t:
            next_t = min(curr_t + step_size, ts[-1])
            rec.attempt(curr_t, ts[-1])
            if solver.adaptive:
                # Take 1 full step.
                next_y_full, _ = solver.step(curr_t, next_t, curr_y, curr_extra)
                # Take 2 half steps.
                midpoint_t = 0.5 * (curr_t + next_t)
                midpoint_y, midpoint_extra = solver.step(curr_t, midpoint_t, curr_y, curr_extra)
                next_y, next_extra = solver.step(midpoint_t, next_t, midpoint_y, midpoint_extra)
                # The controller's value, computed as upstream does (no graph); the recorder
                # adds the gradient for accepted steps afterwards, in one batch.
                with torch.no_grad():
                    error = scaled_error(next_y_full, next_y, solver.rtol, solver.atol)
                error_estimate = error.cpu().item()
                if not math.isfinite(error_estimate):
                    raise NonFiniteError(non_finite_f(float(curr_t)))
                with torch.no_grad():
                    step_size, prev_error_ratio = adaptive_stepping.update_step_size(
                        error_estimate=error_estimate,
                        prev_step_size=step_size,
                        prev_error_ratio=prev_error_ratio
                    )

                if step_size < solver.dt_min:
                    warnings.warn("Hitting minimum allowed step size in adaptive time-stepping.")
                    step_size = solver.dt_min
                    prev_error_ratio = None

                if error_estimate <= 1 or step_size <= solver.dt_min:
                    rec.accept(curr_t, next_t, curr_y, next_y, error, next_y_full)
                    prev_t, prev_y = curr_t, curr_y
                    curr_t, curr_y, curr_extra = next_t, next_y, next_extra
                else:
                    rec.rejected += 1
            else:
                prev_t, prev_y = curr_t, curr_y
                curr_y, curr_extra = solver.step(curr_t, next_t, curr_y, curr_extra)
                rec.accept(prev_t, next_t, prev_y, curr_y, nan)
                curr_t = next_t
        ys.append(interp.linear_interp(t0=prev_t, y0=prev_y, t1=curr_t, y1=curr_y, t=out_t))

    rec.finish(curr_t, curr_y)
    return torch.stack(ys, dim=0), curr_extra


class _RecordingMixin:
    """Upstream's integrate plus recording, active only inside a regnde solve or drop-in block
    of this thread."""

    def __init__(self, sde: Any, **kwargs: Any):
        super().__init__(sde=sde, **kwargs)  # type: ignore[call-arg]
        ctx = SCOPE.active()
        if ctx is None and Block.open_elsewhere():
            warnings.warn(dropin_other_thread("torchsde"), UserWarning, stacklevel=4)
        self._regnde_rec: Recorder | None = None if ctx is None else ctx.recorder_for(self)

    def regnde_dropin_recorder(self, block: Block, key: TorchKey) -> Recorder | None:
        """This solve's recorder inside a drop-in block (``None``: announced, not recorded)."""
        s: Any = self
        if not s.adaptive:
            block.unregularizable(dropin_not_regularized(
                "torchsde.sdeint with adaptive=False computes no error estimate; pass "
                "adaptive=True to regularize it"))
            return None
        sensitivity = "adjoint" if called_from(_SDEINT_ADJOINT) else "direct"
        reg = block.regularizer
        reg.check(sensitivity=sensitivity, tableau=None, backend="torchsde")
        rec = DropinRecorder(self, block=block, key=key, sensitivity=sensitivity)
        _count_drift(s.sde, rec)
        return rec

    def integrate(self, y0: torch.Tensor, ts: torch.Tensor, extra0: Any) -> Any:
        rec = self._regnde_rec
        if rec is None:
            return super().integrate(y0, ts, extra0)  # type: ignore[misc]
        if isinstance(rec, DropinRecorder):
            rec.begin(ts)
            out = _recorded_integrate(self, rec, y0, ts, extra0)
            rec.end()
            return out
        return _recorded_integrate(self, rec, y0, ts, extra0)


_SDEINT_ADJOINT = ts_adjoint.sdeint_adjoint.__code__


def _count_drift(sde: Any, rec: DropinRecorder) -> None:
    """Count the drift evaluations of torchsde's wrapped SDE (``rec.nfe``), as the drop-in
    cannot wrap the user's object before torchsde does."""
    for name in ("f", "f_and_g", "f_and_g_prod"):
        fn = getattr(sde, name, None)
        # torchsde's defaults for the combined calls evaluate ``f`` itself: counted there
        if callable(fn) and "default" not in getattr(fn, "__name__", ""):
            def counted(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
                rec.nfe += 1
                return _fn(*args, **kwargs)

            object.__setattr__(sde, name, counted)


class DropinRecorder(Recorder):
    """A :class:`Recorder` that evaluates the block's regularizer when the solve ends."""

    def __init__(self, solver: Any, *, block: Block, key: TorchKey, sensitivity: str):
        reg = block.regularizer
        super().__init__(solver, max_steps=block.max_steps,
                         keep_states=keeps_states(reg, block.trace_mode),
                         full=block.trace_mode == "full", probes={},
                         error_grad=not only_local(reg))
        self.block, self.key, self.sensitivity = block, key, sensitivity
        self.nfe = 0

    def begin(self, ts: torch.Tensor) -> None:
        self.plan = Plan(self.block.regularizer, self.key, ts[0], ts[-1], self.block.trace_mode)
        self.probes = self.plan.probes
        self.t_first, self.t_last = ts[0].detach(), ts[-1].detach()

    def end(self) -> None:
        trace = self.trace()
        run = SdeRun(self, trace, self.t_first, self.t_last, self.sensitivity, self.solver.dt)
        nfe = self.nfe
        value, nfe_reg = regularize(self.plan, run, lambda: self.nfe)
        stats = Stats(nfe=nfe, nfe_reg=nfe_reg, n_steps=trace.n_steps, n_rejected=self.rejected)
        self.solver = None
        self.block.collect(value, stats, trace)


_RECORDING: dict[type, type] = {}
_class_lock = threading.Lock()


def _recording_class(cls: type) -> type:
    with _class_lock:
        if cls not in _RECORDING:
            _RECORDING[cls] = type(f"Recording{cls.__name__}", (_RecordingMixin, cls), {})
        return _RECORDING[cls]


def _select(method: str, sde_type: str) -> type:
    return _recording_class(ORIGINAL_SELECT(method, sde_type))


def _install() -> None:
    setattr(ts_methods, "select", _select)  # noqa: B010


def _restore() -> None:
    setattr(ts_methods, "select", ORIGINAL_SELECT)  # noqa: B010


#: ``torchsde._core.methods.select`` returns recording subclasses while a solve is open.
SCOPE = RecordingScope(_install, _restore)
register_scope(SCOPE)

