"""The solver classes regnde runs torchdiffeq's methods with, and their installation.

:class:`_RecordingMixin` is upstream's adaptive step plus recording; it makes the recording
subclasses of torchdiffeq's own adaptive methods and :class:`TableauSolver`, the class of a
registered tableau torchdiffeq lacks. Other torchdiffeq methods (fixed-step ones,
``scipy_solver``) run as announcing subclasses, which a drop-in block reports as not
regularized. :data:`SCOPE` installs all of them into torchdiffeq's solver table while a regnde
solve or drop-in block is open, and puts the table back when the last one closes.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torchdiffeq._impl.rk_common import (
    RKAdaptiveStepsizeODESolver,
    _runge_kutta_step,
    _RungeKuttaState,
)

from regnde.adapters.torch.dropin import Block, register_scope
from regnde.adapters.torch.keys import TorchKey
from regnde.adapters.torch.scope import RecordingScope, called_from
from regnde.adapters.torch.td_recorder import NonFinite, Recorder, Underflow
from regnde.adapters.torch.td_tableau import (
    ALIASES,
    NATIVE,
    ORIGINAL,
    SOLVERS,
    Counting,
    diff_weights,
    native_tableau,
    td_adjoint,
    td_method_name,
    td_misc,
    to_torchdiffeq,
)
from regnde.errors import (
    dropin_fixed_step,
    dropin_not_regularized,
    dropin_other_thread,
    non_finite_f,
    underflow,
)
from regnde.tableau import Tableau

_ADJOINT_FORWARD = td_adjoint.OdeintAdjointMethod.forward.__code__


def _inside_adjoint_forward() -> bool:
    return called_from(_ADJOINT_FORWARD)


def _next_in_step(ts: torch.Tensor, index: int, t0: torch.Tensor, dt: torch.Tensor
                  ) -> torch.Tensor | None:
    """The next of torchdiffeq's ``step_t`` / ``jump_t`` times (``ts[index]``) if it falls
    strictly inside the step ``(t0, t0 + dt)``."""
    if len(ts):
        t = ts[index]
        if t0 < t < t0 + dt:
            return t
    return None


class _RecordingMixin:
    """Upstream's adaptive step plus recording, active only inside a regnde context."""

    regnde_tableau: Tableau
    generic: bool = False

    def __init__(self, func: Any, y0: torch.Tensor, rtol: Any, atol: Any, **kwargs: Any):
        ctx = _context()
        if ctx is not None:  # the drop-in leaves bad output to torchdiffeq, as without it
            func = Counting(func, check=not isinstance(ctx, Block))
        super().__init__(func=func, y0=y0, rtol=rtol, atol=atol, **kwargs)  # type: ignore[call-arg]
        self.regnde_w = diff_weights(self.regnde_tableau, y0)
        self._rec: Recorder | None = None if ctx is None else ctx.recorder_for(self)

    def regnde_dropin_recorder(self, block: Block, key: TorchKey) -> Recorder:
        """This solve's recorder inside a drop-in block: torchdiffeq's arithmetic untouched."""
        sensitivity = "adjoint" if _inside_adjoint_forward() else "direct"
        block.regularizer.check(sensitivity=sensitivity, tableau=self.regnde_tableau,
                                backend="torchdiffeq")
        rec = Recorder(self, regularizer=block.regularizer, key=key, sensitivity=sensitivity,
                       trace=block.trace_mode, max_steps=block.max_steps, grad=True,
                       host_grads=True)
        rec.on_end = lambda r: block.collect(r.value, r.stats, r.trace)
        rec.on_skip = block.announce
        return rec

    def integrate(self, t: torch.Tensor) -> torch.Tensor:
        rec = self._rec
        if rec is None:
            return super().integrate(t)  # type: ignore[misc]
        if len(t) < 2:  # torchdiffeq answers y0: nothing was integrated
            self._rec = None
            rec.skipped(f"odeint with a single output time (t={t.tolist()}) integrates nothing")
            return super().integrate(t)  # type: ignore[misc]
        rec.begin(t.to(self.dtype))  # type: ignore[attr-defined]
        solution = super().integrate(t)  # type: ignore[misc]
        rec.end()
        return solution

    def integrate_until_event(self, t0: torch.Tensor, event_fn: Any) -> Any:
        rec = self._rec
        if rec is None:
            return super().integrate_until_event(t0, event_fn)  # type: ignore[misc]
        rec.begin_event(t0.to(self.dtype))  # type: ignore[attr-defined]
        event_t, solution = super().integrate_until_event(t0, event_fn)  # type: ignore[misc]
        rec.end(event_t=event_t.to(self.dtype))  # type: ignore[attr-defined]
        return event_t, solution

    def _adaptive_step(self, rk_state: Any) -> Any:
        if self._rec is None and not self.generic:
            return super()._adaptive_step(rk_state)  # type: ignore[misc]
        return self._regnde_step(rk_state)

    def _regnde_step(self, rk_state: Any) -> Any:
        # Upstream rk_common.RKAdaptiveStepsizeODESolver._adaptive_step, plus recording and
        # regnde's errors. Keep the arithmetic identical: ys must equal torchdiffeq's.
        s: Any = self
        rec = self._rec
        y0, f0, _, t0, dt, interp_coeff = rk_state
        if not torch.isfinite(dt):
            dt = s.min_step
        dt = dt.clamp(s.min_step, s.max_step)
        if rec is None or not rec.host_grads:
            dt = dt.detach()
        s.func.callback_step(t0, y0, dt)
        t1 = t0 + dt
        if not t0 + dt > t0:
            raise Underflow(underflow(float(t0), float(dt)))
        if not torch.isfinite(y0).all():
            raise NonFinite(non_finite_f(float(t0)))
        if rec is not None:
            rec.attempt(t0)

        next_step_t = _next_in_step(s.step_t, s.next_step_index, t0, dt)
        on_step_t = next_step_t is not None
        if next_step_t is not None:
            t1 = next_step_t
            dt = t1 - t0
        next_jump_t = _next_in_step(s.jump_t, s.next_jump_index, t0, dt)
        on_jump_t = next_jump_t is not None
        if next_jump_t is not None:
            on_step_t = False
            t1 = next_jump_t
            dt = t1 - t0

        y1, f1, y1_error, k = _runge_kutta_step(s.func, y0, f0, t0, dt, t1, tableau=s.tableau)
        error_ratio = td_misc._compute_error_ratio(y1_error, s.rtol, s.atol, y0, y1, s.norm)
        accept_step = error_ratio <= 1
        if not accept_step and torch.isnan(error_ratio):  # NaN is never accepted
            raise NonFinite(non_finite_f(float(t0)))
        if dt > s.max_step:
            accept_step = False
        if dt <= s.min_step:
            accept_step = True

        if accept_step:
            s.func.callback_accept_step(t0, y0, dt)
            t_next = t1
            y_next = y1
            if self.generic and not self.regnde_tableau.fsal:
                f1 = s.func(t_next, y_next)
                k_interp = torch.cat([k[..., :1], f1.unsqueeze(-1)], dim=-1)
            else:
                k_interp = k
            interp_coeff = s._interp_fit(y0, y_next, k_interp, dt)
            if on_step_t and s.next_step_index != len(s.step_t) - 1:
                s.next_step_index += 1
            if on_jump_t:
                if s.next_jump_index != len(s.jump_t) - 1:
                    s.next_jump_index += 1
                f1 = s.func(t_next, y_next, perturb=td_misc.Perturb.NEXT)
            f_next = f1
            if rec is not None:
                rec.accept(t0, dt, y0, error_ratio, k, interp_coeff, t_next)
        else:
            s.func.callback_reject_step(t0, y0, dt)
            t_next = t0
            y_next = y0
            f_next = f0
            if rec is not None:
                rec.rejected += 1
        dt_next = td_misc._optimal_step_size(dt, error_ratio, s.safety, s.ifactor, s.dfactor,
                                              s.order)
        dt_next = dt_next.clamp(s.min_step, s.max_step)
        return _RungeKuttaState(y_next, f_next, t0, t_next, dt_next, interp_coeff)


class TableauSolver(_RecordingMixin, RKAdaptiveStepsizeODESolver):
    """A torchdiffeq solver for any registered :class:`Tableau` (subclassed per tableau)."""

    generic = True

    def _interp_fit(self, y0: torch.Tensor, y1: torch.Tensor, k: torch.Tensor,
                    dt: torch.Tensor) -> list[torch.Tensor]:
        if self.regnde_tableau.mid is not None and not self.generic_hermite:
            return super()._interp_fit(y0, y1, k, dt)
        # Cubic Hermite from f(t0) = k[..., 0] and f(t1) = k[..., -1] (set by the caller).
        dt = dt.type_as(y0)
        f0, f1 = k[..., 0], k[..., -1]
        return [y0, dt * f0, 3 * (y1 - y0) - dt * (2 * f0 + f1), 2 * (y0 - y1) + dt * (f0 + f1)]


def tableau_solver(tab: Tableau) -> type:
    """A fresh :class:`TableauSolver` subclass running ``tab``."""
    mid = torch.tensor(tab.mid if tab.mid is not None else [0.0] * tab.stages,
                       dtype=torch.float64)
    return type(f"Regnde_{tab.name}", (TableauSolver,), {
        "order": tab.order, "tableau": to_torchdiffeq(tab), "mid": mid, "regnde_tableau": tab,
        # Hermite needs f(t1); for FSAL tableaus k[..., -1] is f(t1), otherwise the step
        # passes f(t1) as the last column. mid weights need all stages, so only FSAL uses them.
        "generic_hermite": tab.mid is None or not tab.fsal,
    })


_RECORDING: dict[str, type] = {}


def _recording_class(td_name: str) -> type:
    if td_name not in _RECORDING:
        base = ORIGINAL[td_name]
        canonical = ALIASES.get(td_name, td_name)
        _RECORDING[td_name] = type(f"Recording{base.__name__}", (_RecordingMixin, base),
                                   {"regnde_tableau": native_tableau(canonical)})
    return _RECORDING[td_name]


_ANNOUNCING: dict[str, type] = {}


def _announcing_class(td_name: str) -> type:
    """torchdiffeq's own class for a method regnde cannot regularize (fixed-step methods,
    ``scipy_solver``): it runs unchanged, and a drop-in block says so once."""
    if td_name not in _ANNOUNCING:
        base = ORIGINAL[td_name]

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            ctx = _context()
            if ctx is not None:
                ctx.unregularizable(
                    dropin_not_regularized("scipy_solver runs outside torch and has no steps "
                                           "to record") if td_name == "scipy_solver"
                    else dropin_fixed_step(td_name))
            base.__init__(self, *args, **kwargs)

        _ANNOUNCING[td_name] = type(f"Announcing{base.__name__}", (base,),
                                    {"__init__": __init__})
    return _ANNOUNCING[td_name]


_SAVED: list[dict[str, Any]] = []


def _install() -> None:
    """Recording subclasses of torchdiffeq's own adaptive methods, announcing ones of the rest,
    and every registered tableau torchdiffeq lacks; :func:`_restore` puts the table back as it
    was, so nothing of regnde's stays in torchdiffeq once the last context closes."""
    from regnde.plugins.manager import registry

    _SAVED.append(dict(SOLVERS))
    adaptive = set(NATIVE.values())
    for td_name in ORIGINAL:
        SOLVERS[td_name] = (_recording_class(td_name) if td_name in adaptive
                            else _announcing_class(td_name))
    for name, tab in registry().tableaus().items():
        if name not in NATIVE:
            SOLVERS[td_method_name(tab)] = _tableau_class(tab)


def _restore() -> None:
    SOLVERS.clear()
    SOLVERS.update(_SAVED.pop())


SCOPE = RecordingScope(_install, _restore)
register_scope(SCOPE)


def _context() -> Any:
    """The innermost regnde context of this thread; warns once when a drop-in block is open
    on another thread only (blocks are per thread, so this solve is not regularized)."""
    ctx = SCOPE.active()
    if ctx is None and Block.open_elsewhere():
        warnings.warn(dropin_other_thread("torchdiffeq"), UserWarning, stacklevel=4)
    return ctx


@functools.cache
def _tableau_class(tab: Tableau) -> type:
    return tableau_solver(tab)

