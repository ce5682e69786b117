"""The torchdiffeq backend, a regnde plugin.

How it records: torchdiffeq keeps stages and errors local to ``_adaptive_step``, so regnde
runs each adaptive Runge–Kutta method through a subclass of torchdiffeq's own solver class whose
step is upstream's step plus recording (same operations, so ``ys`` are identical in value). The
subclasses are installed into ``torchdiffeq``'s solver table only while a regnde solve or a
:func:`regularize` block is active, and record only for the thread that opened it; solves run
by a backward pass (the adjoint's) never record. Registered tableaus that torchdiffeq lacks
(``tsit5``, third-party ones) become torchdiffeq methods under their own names.

Methods: ``dopri5``, ``dopri8``, ``bosh3``, ``fehlberg2``, ``heun`` (alias ``adaptive_heun``)
run torchdiffeq's own classes with their own dense output. torchdiffeq treats every tableau as
FSAL, so its ``adaptive_heun`` starts each step from ``f`` at the previous step's Euler
predictor instead of at ``y1``; regnde reproduces that as torchdiffeq runs it. Registered
tableaus run a generic class that evaluates ``f(t1, y1)`` for non-FSAL tableaus and interpolates
by cubic Hermite between steps (or by the tableau's ``mid`` weights, if given).

Integral regularizers (``TaylorDerivative``, ``KineticEnergy``, ``JacobianFrobenius``): the
solve runs torchdiffeq on the tuple state ``(y, r)`` with
:class:`regnde.adapters.torch.augment.AugmentedField` and the ``norm`` option set to the plain
problem's norm of ``y`` alone, so the steps, errors and ``ys`` are bit for bit those of the plain
solve; the recorder keeps the ``y`` part of states and stages, runs local steps on the plain
field, and evaluates the regularizer once ``r(t1)`` is known (after ``odeint_adjoint`` returns,
under the adjoint).

Step sizes are constants for autodiff (torchdiffeq lets the first one carry a gradient), so
gradients through ``ys`` can differ from plain torchdiffeq's in the last digits.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torchdiffeq  # noqa: F401  (imports the submodules below)
from torchdiffeq._impl.interp import _interp_evaluate
from torchdiffeq._impl.rk_common import (
    RKAdaptiveStepsizeODESolver,
    _ButcherTableau,
    _runge_kutta_step,
    _RungeKuttaState,
)

from regnde.adapters import builtin
from regnde.adapters.torch.dropin import Block, register_scope
from regnde.adapters.torch.keys import TorchKey, check_field_output, make_key
from regnde.adapters.torch.scope import RecordingScope, called_from
from regnde.backend import Backend, SolveRequest, StepRequest
from regnde.engine import Plan, keeps_states, regularize, solution
from regnde.errors import (
    MaxStepsExceeded,
    NonFiniteError,
    StepSizeUnderflow,
    dropin_fixed_step,
    dropin_not_regularized,
    dropin_other_thread,
    max_steps_exceeded,
    non_finite_f,
    underflow,
)
from regnde.plugins.hookspecs import hookimpl
from regnde.tableau import Tableau, equal_c_pair
from regnde.trace import Solution, Stats, StepResult, Trace

# torchdiffeq._impl.__init__ shadows the module ``odeint`` with the function of that name.
_td_odeint = importlib.import_module("torchdiffeq._impl.odeint")
_td_adjoint = importlib.import_module("torchdiffeq._impl.adjoint")
_td_misc = importlib.import_module("torchdiffeq._impl.misc")

SOLVERS: dict[str, Any] = _td_odeint.SOLVERS
_ORIGINAL: dict[str, Any] = dict(SOLVERS)

#: canonical regnde name -> torchdiffeq name, for torchdiffeq's own adaptive RK methods.
NATIVE = {"dopri5": "dopri5", "dopri8": "dopri8", "bosh3": "bosh3", "fehlberg2": "fehlberg2",
          "heun": "adaptive_heun"}
ALIASES = {"adaptive_heun": "heun"}
#: torchdiffeq's own solver arguments (anything else in ``options`` is an error).
SOLVER_OPTIONS = ("first_step", "min_step", "max_step", "step_t", "jump_t", "safety", "ifactor",
                  "dfactor", "max_num_steps", "dtype", "norm")
ADJOINT_OPTIONS = ("adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options",
                   "adjoint_params")


# -- errors, as torchdiffeq's own ----------------------------------------------------------------
class Underflow(StepSizeUnderflow, AssertionError):
    """regnde's :class:`StepSizeUnderflow`, and torchdiffeq's own ``AssertionError``."""


class NonFinite(NonFiniteError, AssertionError):
    """regnde's :class:`NonFiniteError`; torchdiffeq fails there with an ``AssertionError``."""


class TooManySteps(MaxStepsExceeded, AssertionError):
    """regnde's :class:`MaxStepsExceeded`, and torchdiffeq's ``max_num_steps`` assertion."""


# -- tableaus ---------------------------------------------------------------------------------
def to_regnde(name: str, td: _ButcherTableau, order: int, pair: tuple[int, int] | None,
              mid: Any = None) -> Tableau:
    """A :class:`Tableau` from torchdiffeq's coefficients (the values it actually runs)."""
    c = (0.0, *(float(x) for x in td.alpha))
    a = ((), *(tuple(float(x) for x in row) for row in td.beta))
    mid_t = None if mid is None else tuple(float(x) for x in mid)
    return Tableau(name, order=order, c=c, a=a, b=tuple(float(x) for x in td.c_sol),
                   b_error=tuple(float(x) for x in td.c_error), stiffness_pair=pair, mid=mid_t)


def to_torchdiffeq(tab: Tableau) -> _ButcherTableau:
    f64 = torch.float64
    return _ButcherTableau(
        alpha=torch.tensor(tab.c[1:], dtype=f64),
        beta=[torch.tensor(row, dtype=f64) for row in tab.a[1:]],
        c_sol=torch.tensor(tab.b, dtype=f64),
        c_error=torch.tensor(tab.b_error, dtype=f64),
    )


@functools.cache
def native_tableau(name: str) -> Tableau:
    cls = _ORIGINAL[NATIVE[name]]
    c = [0.0, *(float(x) for x in cls.tableau.alpha)]
    return to_regnde(name, cls.tableau, cls.order, equal_c_pair(c), cls.mid)


# -- the one RK step every path uses -----------------------------------------------------------
def _stiffness_ratio(k: torch.Tensor, tab: Tableau, w: torch.Tensor) -> torch.Tensor:
    """``|k_p - k_q| / |sum_j w_j k_j|``: Shampine's estimate times ``|dt|`` (stages last).

    Runs every accepted step, so it is four kernels: the caller divides by ``|dt|`` (in one
    batch for a whole trace)."""
    p, q = tab.stiffness_pair  # type: ignore[misc]
    num = torch.dist(k[..., p], k[..., q])
    den = torch.linalg.vector_norm(torch.matmul(k, w))
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _stiffness(k: torch.Tensor, dt: torch.Tensor, tab: Tableau, w: torch.Tensor | None
               ) -> torch.Tensor | None:
    """Shampine's estimate ``|k_p - k_q| / |Y_p - Y_q|`` with ``Y_p - Y_q = dt sum_j w_j k_j``."""
    if w is None:
        return None
    return _stiffness_ratio(k, tab, w) / dt.abs().to(k.dtype)


def _diff_weights(tab: Tableau, like: torch.Tensor) -> torch.Tensor | None:
    """``w`` with ``Y_p - Y_q = dt * sum_j w_j k_j`` for the stiffness pair, or ``None``."""
    w = tab.stage_difference_weights()
    return None if w is None else torch.tensor(w, dtype=like.dtype, device=like.device)


def rk_step(func: Any, tab: Tableau, td: _ButcherTableau, y: torch.Tensor, f0: torch.Tensor,
            t0: torch.Tensor, dt: torch.Tensor, rtol: Any, atol: Any, norm: Any,
            w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                             torch.Tensor]:
    """``(y1, error, stiffness, k)`` of one step in the solver's (increasing) time."""
    y1, _, y1_error, k = _runge_kutta_step(func, y, f0, t0, dt, t0 + dt, tableau=td)
    error = _td_misc._compute_error_ratio(y1_error, rtol, atol, y, y1, norm)
    return y1, error, _stiffness(k, dt, tab, w), k


def _device_tableau(td: _ButcherTableau, like: torch.Tensor) -> _ButcherTableau:
    kw = {"dtype": like.dtype, "device": like.device}
    return _ButcherTableau(alpha=td.alpha.to(**kw), beta=[b.to(**kw) for b in td.beta],
                           c_sol=td.c_sol.to(**kw), c_error=td.c_error.to(**kw))


class _Counting:
    """Counts vector-field evaluations; forwards torchdiffeq's callbacks. With ``check`` the
    first evaluation's shape and dtype are checked against the state's."""

    def __init__(self, func: Any, check: bool = False):
        self.func, self.n, self.check = func, 0, check

    def __call__(self, t: Any, y: Any, **kw: Any) -> Any:
        self.n += 1
        out = self.func(t, y, **kw)
        if self.check:
            self.check = False
            check_field_output(out, y)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.func, name)


# -- recording ---------------------------------------------------------------------------------
_ADJOINT_FORWARD = _td_adjoint.OdeintAdjointMethod.forward.__code__


def _inside_adjoint_forward() -> bool:
    return called_from(_ADJOINT_FORWARD)


class Layout:
    """Where ``y`` sits in torchdiffeq's flat state ``cat([y.reshape(-1), r])`` of an augmented
    solve, and the plain problem's field and norm (for local steps and dense output of ``y``).

    Args:
        shape: ``y0.shape``. f: the user's field. norm: the plain problem's error norm.
    """

    def __init__(self, shape: torch.Size, f: Any, norm: Any):
        self.shape, self.n = shape, int(np.prod(shape)) if len(shape) else 1
        self.plain = _Counting(f)
        self.norm = norm

    def y(self, flat: torch.Tensor) -> torch.Tensor:
        """``(n_total,)`` -> ``y0.shape``."""
        return flat[: self.n].view(self.shape)

    def stages(self, k: torch.Tensor) -> torch.Tensor:
        """``(n_total, stages)`` -> ``(*y0.shape, stages)``."""
        return k[: self.n].reshape(*self.shape, k.shape[-1])


class Recorder:
    """Collects one solve's accepted steps, then evaluates the regularizer on them.

    With a :class:`Layout` (an augmented solve) it records the ``y`` part only and, with
    ``defer``, evaluates the regularizer in :meth:`finish` once the integrals are known."""

    def __init__(self, solver: Any, *, regularizer: Any, key: TorchKey, sensitivity: str,
                 trace: str, max_steps: int | None, grad: bool, layout: Layout | None = None,
                 defer: bool = False, host_grads: bool = False):
        self.solver = solver
        #: the drop-in keeps torchdiffeq's own arithmetic, step sizes' gradients included
        self.host_grads = host_grads
        self.counter: _Counting = solver.func
        self.regularizer, self.key, self.sensitivity = regularizer, key, sensitivity
        self.trace_mode, self.max_steps, self.grad = trace, max_steps, grad
        self.tab: Tableau = solver.regnde_tableau
        self.reversed = _is_reversed(self.counter.func)
        self.keep_states = keeps_states(regularizer, trace)
        self.ts: list[torch.Tensor] = []
        self.dts: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.errors: list[torch.Tensor] = []
        self.stiff: list[torch.Tensor] = []
        self.attempts = 0
        self.rejected = 0
        self.plan: Plan | None = None
        self.probes: dict[int, torch.Tensor] = {}  # in solver time
        self.captured: dict[int, torch.Tensor] = {}
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
                plain = _td_misc._ReverseFunc(plain, mul=-1.0)
            self.func, self.norm = _td_misc._PerturbFunc(plain), layout.norm

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
            self.stiff.append(_stiffness_ratio(k, self.tab, w))
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
    return isinstance(inner, _td_misc._ReverseFunc)


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
        h = _td_misc._select_initial_step(rec.func, tau_s, y, solver.order - 1, solver.rtol,
                                          solver.atol, rec.norm).detach()
        h = torch.minimum(h.to(tau_s.dtype), rec.t1 - tau_s)
        return rec.to_solver(h)


# -- solver classes ----------------------------------------------------------------------------
class _RecordingMixin:
    """Upstream's adaptive step plus recording, active only inside a regnde context."""

    regnde_tableau: Tableau
    generic: bool = False

    def __init__(self, func: Any, y0: torch.Tensor, rtol: Any, atol: Any, **kwargs: Any):
        ctx = _context()
        if ctx is not None:  # the drop-in leaves bad output to torchdiffeq, as without it
            func = _Counting(func, check=not isinstance(ctx, Block))
        super().__init__(func=func, y0=y0, rtol=rtol, atol=atol, **kwargs)  # type: ignore[call-arg]
        self.regnde_w = _diff_weights(self.regnde_tableau, y0)
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

        on_step_t = False
        if len(s.step_t):
            next_step_t = s.step_t[s.next_step_index]
            on_step_t = t0 < next_step_t < t0 + dt
            if on_step_t:
                t1 = next_step_t
                dt = t1 - t0
        on_jump_t = False
        if len(s.jump_t):
            next_jump_t = s.jump_t[s.next_jump_index]
            on_jump_t = t0 < next_jump_t < t0 + dt
            if on_jump_t:
                on_step_t = False
                t1 = next_jump_t
                dt = t1 - t0

        y1, f1, y1_error, k = _runge_kutta_step(s.func, y0, f0, t0, dt, t1, tableau=s.tableau)
        error_ratio = _td_misc._compute_error_ratio(y1_error, s.rtol, s.atol, y0, y1, s.norm)
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
                f1 = s.func(t_next, y_next, perturb=_td_misc.Perturb.NEXT)
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
        dt_next = _td_misc._optimal_step_size(dt, error_ratio, s.safety, s.ifactor, s.dfactor,
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
        base = _ORIGINAL[td_name]
        canonical = ALIASES.get(td_name, td_name)
        _RECORDING[td_name] = type(f"Recording{base.__name__}", (_RecordingMixin, base),
                                   {"regnde_tableau": native_tableau(canonical)})
    return _RECORDING[td_name]


_ANNOUNCING: dict[str, type] = {}


def _announcing_class(td_name: str) -> type:
    """torchdiffeq's own class for a method regnde cannot regularize (fixed-step methods,
    ``scipy_solver``): it runs unchanged, and a drop-in block says so once."""
    if td_name not in _ANNOUNCING:
        base = _ORIGINAL[td_name]

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
    for td_name in _ORIGINAL:
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


def td_method_name(tab: Tableau) -> str:
    """The name a registered tableau runs under in torchdiffeq's solver table."""
    return tab.name if tab.name not in _ORIGINAL else f"regnde_{tab.name}"


class _SolveContext:
    """One :func:`regnde.solve` call: records the first solver it sees."""

    def __init__(self, request: SolveRequest, grad: bool, key: TorchKey,
                 layout: Layout | None = None):
        self.request, self.grad, self.key, self.layout = request, grad, key, layout
        self.recorder: Recorder | None = None

    def unregularizable(self, message: str) -> None:
        """A fixed-step torchdiffeq solve inside ``f``: not this solve's business."""

    def recorder_for(self, solver: Any) -> Recorder | None:
        if self.recorder is not None:
            return None
        r = self.request
        self.recorder = Recorder(solver, regularizer=r.regularizer, key=self.key,
                                 sensitivity=r.sensitivity, trace=r.trace,
                                 max_steps=r.max_steps, grad=self.grad, layout=self.layout,
                                 defer=self.layout is not None)
        return self.recorder


# -- the backend ---------------------------------------------------------------------------------
class TorchdiffeqBackend(Backend):
    """``backend="torchdiffeq"``: ``odeint`` (direct) and ``odeint_adjoint`` (adjoint)."""

    name = "torchdiffeq"
    framework = "torch"
    augments = True
    default_for = ("ode",)
    install_hint = builtin(__name__).install
    distributed = "regnde.adapters.torch.distributed"

    @functools.cached_property
    def _native(self) -> Mapping[str, Tableau | None]:
        return {name: native_tableau(name) for name in NATIVE}

    def native_methods(self) -> Mapping[str, Tableau | None]:
        return self._native

    def aliases(self) -> Mapping[str, str]:
        return ALIASES

    def owns(self, y0: Any) -> bool:
        return isinstance(y0, torch.Tensor)

    def make_key(self, key: Any) -> TorchKey:
        return make_key(key)

    def td_method(self, method: str, tableau: Tableau | None) -> str:
        if method in NATIVE:
            return NATIVE[method]
        assert tableau is not None
        return td_method_name(tableau)

    def solve(self, request: SolveRequest) -> Solution:
        r = request
        make_key(r.key)  # validate early
        options = dict(r.options)
        adjoint_kw = {k: options.pop(k) for k in ADJOINT_OPTIONS if k in options}
        _check_solver_options(options, r.sensitivity, adjoint_kw)
        if not callable(r.f):
            raise ValueError(f"f must be a callable f(t, y) returning dy/dt, got {r.f!r}.")
        method = self.td_method(r.method, r.tableau)
        key = make_key(r.key)
        func, y0, aug, layout = r.f, r.y0, None, None
        if r.regularizer is not None and r.regularizer.needs_augmentation():
            func, y0, aug, layout = _augment(r, key, options)
        ctx = _SolveContext(r, grad=torch.is_grad_enabled(), key=key, layout=layout)
        with SCOPE.opened(ctx):
            if r.sensitivity == "adjoint":
                if not isinstance(r.f, torch.nn.Module) and "adjoint_params" not in adjoint_kw:
                    raise ValueError(
                        "sensitivity='adjoint' needs f to be a torch.nn.Module (its parameters "
                        "get gradients), or pass adjoint_params=(...) explicitly."
                    )
                adjoint_kw.setdefault("adjoint_method", method)
                adjoint_kw.setdefault("adjoint_options",
                                      {k: v for k, v in options.items() if k != "norm"})
                ys = _td_adjoint.odeint_adjoint(func, y0, r.t, rtol=r.rtol, atol=r.atol,
                                                method=method, options=options, **adjoint_kw)
            else:
                ys = _td_odeint.odeint(func, y0, r.t, rtol=r.rtol, atol=r.atol, method=method,
                                       options=options)
        rec = ctx.recorder
        assert rec is not None, "torchdiffeq did not run a regnde solver"
        if aug is not None:
            ys, rs = ys
            integrals = {id(it.owner): rs[-1, i] for i, it in enumerate(aug.integrands)}
            rec.finish(integrals, nfe_reg=aug.n_evals)
        return solution(ys, rec.trace, rec.stats, rec.value)

    def regularize(self, regularizer: Any, key: Any = None, trace: str = "summary",
                   max_steps: int | None = None) -> Block:
        return Block(regularizer, key=key, trace=trace, max_steps=max_steps)

    def step(self, request: StepRequest) -> StepResult:
        r = request
        if not isinstance(r.y, torch.Tensor):
            raise ValueError(f"y must be a torch.Tensor on torchdiffeq, got {type(r.y)}.")
        y = r.y
        t_dtype = torch.promote_types(torch.float64, y.abs().dtype)
        t = torch.as_tensor(r.t, dtype=t_dtype, device=y.device).detach()
        tab = r.tableau if r.method not in NATIVE else native_tableau(r.method)
        assert tab is not None
        cls: Any = _ORIGINAL[NATIVE[r.method]] if r.method in NATIVE else tableau_solver(tab)
        td = _device_tableau(cls.tableau, y)
        norm = r.options.get("norm", _td_misc._rms_norm)
        rtol = torch.as_tensor(r.rtol, dtype=t_dtype, device=y.device)
        atol = torch.as_tensor(r.atol, dtype=t_dtype, device=y.device)
        forward = _td_misc._PerturbFunc(r.f)
        if r.dt is None:
            f0 = forward(t, y)
            dt = r.options.get("first_step")
            if dt is None:
                dt = _td_misc._select_initial_step(forward, t, y, cls.order - 1, rtol, atol,
                                                   norm, f0=f0)
            dt = torch.as_tensor(dt, dtype=t_dtype, device=y.device).detach()
            sign = 1.0
        else:
            dt = torch.as_tensor(r.dt, dtype=t_dtype, device=y.device).detach()
            sign = 1.0 if bool(dt >= 0) else -1.0
        func = forward if sign > 0 else _td_misc._PerturbFunc(_td_misc._ReverseFunc(r.f, -1.0))
        ts, dts = sign * t, sign * dt
        if r.dt is not None or sign < 0:
            f0 = func(ts, y)
        y1, error, stiff, k = rk_step(func, tab, td, y, f0, ts, dts, rtol, atol, norm,
                                      _diff_weights(tab, y))
        # sign * k: stages of the user's f, not of the time-reversed one used for dt < 0
        return StepResult(t=t, dt=dt, y1=y1, error=error, stiffness=stiff,
                          stages=sign * k.movedim(-1, 0))


def _augment(r: SolveRequest, key: TorchKey, options: dict[str, Any]
             ) -> tuple[Any, tuple[torch.Tensor, torch.Tensor], Any, Layout]:
    """The augmented problem ``(y, r)`` for integral regularizers; sets ``options["norm"]`` to
    the plain problem's norm on ``y`` alone, so the steps are those of the plain solve."""
    from regnde.adapters.torch.augment import AugmentedField

    integrands = r.regularizer.integrands(key, r.y0)
    sign = 1.0 if bool(r.t[-1] > r.t[0]) else -1.0
    aug = AugmentedField(r.f, integrands, sign)
    plain_norm = options.get("norm", _td_misc._rms_norm)

    def norm_on_y(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return plain_norm(state[0])

    options["norm"] = norm_on_y
    r0 = torch.zeros(len(integrands), dtype=r.y0.dtype, device=r.y0.device)
    return aug, (r.y0, r0), aug, Layout(r.y0.shape, r.f, plain_norm)


def _check_solver_options(options: dict[str, Any], sensitivity: str,
                          adjoint_kw: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(SOLVER_OPTIONS))
    if unknown:
        allowed = ", ".join((*SOLVER_OPTIONS, *ADJOINT_OPTIONS))
        raise ValueError(
            f"unknown torchdiffeq option(s) {unknown}; allowed: {allowed}. "
            f"(regnde's own arguments such as rtol or max_steps are keywords of solve.)"
        )
    if adjoint_kw and sensitivity != "adjoint":
        raise ValueError(f"options {sorted(adjoint_kw)} need sensitivity='adjoint'.")


def _signature_ok() -> bool:
    params = inspect.signature(RKAdaptiveStepsizeODESolver.__init__).parameters
    return all(p in params for p in SOLVER_OPTIONS if p != "norm")


assert _signature_ok(), "torchdiffeq's solver options changed; regnde needs torchdiffeq 0.2.5"


@hookimpl
def regnde_register_backends(register: Callable[[str, Any], None]) -> None:
    register("torchdiffeq", TorchdiffeqBackend)
