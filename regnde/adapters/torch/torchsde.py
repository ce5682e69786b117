"""The torchsde backend, a regnde plugin: neural SDEs with step-doubling error regularization.

``regnde.solve(sde, y0, t, backend="torchsde", ...)`` runs ``torchsde.sdeint`` (``"direct"``)
or ``torchsde.sdeint_adjoint`` (``"adjoint"``) itself, so ``sol.ys`` is identical to torchsde's
for the same Brownian motion. ``sde`` has the torchsde interface: drift ``f(t, y)``, diffusion
``g(t, y)`` (or ``f_and_g``, ``g_prod``, ... as torchsde accepts) and the attributes
``noise_type`` and ``sde_type``; ``y0`` has shape ``(batch, d)``; ``t`` must increase.

Differences from calling torchsde directly (all documented choices):

- regnde passes ``adaptive=True`` unless the call says otherwise: error regularizers need the
  controller's error estimate, which torchsde computes only when stepping adaptively (with
  ``adaptive=False`` they raise ``ValueError`` and ``trace.error`` is NaN).
- ``rtol=None, atol=None`` (the default) means torchsde's own defaults for SDEs,
  ``rtol=1e-5, atol=1e-4`` (on every backend that solves SDEs): the step-doubling error of an SDE
  is dominated by the noise, and the ODE default 1e-6 makes an adaptive Milstein solve take
  thousands of steps.
- ``key`` seeds the Brownian motion (a ``BrownianInterval`` whose entropy comes from the key,
  Levy area as torchsde chooses it for the method) when no ``bm`` option is given; the same key
  gives the same path and the same value. ``key=None`` draws the entropy from torch's global
  generator.
- ``max_steps`` counts every step attempt (torchsde has no limit); exceeding it raises
  :class:`regnde.MaxStepsExceeded`.
- ``sol.stats.nfe`` counts drift evaluations (calls of the SDE's ``f``, ``f_and_g`` or
  ``f_and_g_prod``, renamed ones included), torchsde's own shape checks included; the diffusion
  is evaluated alongside.
- torchsde's keyword arguments (``dt``, ``adaptive``, ``bm``, ``dt_min``, ``options``, ``names``,
  ``logqp``, ``extra``, ``extra_solver_state`` and the ``adjoint_*`` ones) pass through unchanged;
  unknown ones raise ``ValueError`` (torchsde only warns). With ``logqp=True`` the log-ratio
  increments are ``sol.logqp``; with ``extra=True`` the solver's extra state is
  ``sol.extra_solver_state``.

How it records: torchsde has no solver registry (``methods.select`` is an if-chain), so while a
regnde solve is active ``torchsde._core.methods.select`` returns a subclass of torchsde's own
solver class whose ``integrate`` is upstream's loop (``BaseSDESolver.integrate``) plus recording,
with the same arithmetic and the same Brownian queries in the same order. The patch is
reference-counted and lock-protected; a subclass records only for the thread that opened the
solve, and never in a backward pass (the adjoint's own solve).

What is recorded per accepted step: start time, step length (``sum(trace.dt) == t1 - t0`` to
rounding: torchsde clips the last step to ``t1`` itself), the state at the start (``"full"``)
and the step-doubling error: the difference between one full step and two half steps on the same
Brownian path, scaled exactly as torchsde's controller scales it
(``rms((y_full - y_half) / max(rtol * max(|y_full|, |y_half|) + atol, 1e-7))``, clamped below at
``1e-7``; ``adaptive_stepping.compute_error``), differentiable with ``sensitivity="direct"``
(its gradient is built in one batch after the solve; with a regularizer made only of local
terms, which never read it, ``trace.error`` holds the values without a gradient: building it
retains every full step's graph and costs 5-10% of a small training iteration).
``trace.stiffness`` is ``None``: step doubling has no stiffness pair, so the stiffness
regularizers raise ``ValueError``.

Local regularizers take one adaptive-style step (full step and two halves) from
``u(tau)`` with the solve's own solver, Brownian motion and tolerances; ``u(tau)`` comes from
torchsde's dense output (linear interpolation between accepted steps). The extra step is clipped
to end at ``t1``, where the Brownian motion ends. Solvers with extra state
(``reversible_heun``) start it afresh at ``(tau, u)``. ``first_stage="constant"`` has no meaning
for step doubling and raises ``ValueError``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import threading
import warnings
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torchsde  # noqa: F401  (imports the submodules below)
from torchsde import BrownianInterval
from torchsde._core import adaptive_stepping, base_sde, interp
from torchsde.settings import LEVY_AREA_APPROXIMATIONS, METHODS, NOISE_TYPES, SDE_TYPES

from regnde.adapters import builtin
from regnde.adapters.torch.dropin import Block, register_scope
from regnde.adapters.torch.keys import TorchKey, check_field_output, make_key
from regnde.adapters.torch.scope import RecordingScope, called_from
from regnde.backend import Backend, SolveRequest, StepRequest
from regnde.engine import Plan, keeps_states, regularize, solution
from regnde.errors import (
    MaxStepsExceeded,
    NonFiniteError,
    dropin_not_regularized,
    dropin_other_thread,
    max_steps_exceeded,
    non_finite_f,
)
from regnde.plugins.hookspecs import hookimpl
from regnde.regularizers import GlobalError, LocalError, LocalStiffness
from regnde.tableau import Tableau
from regnde.trace import Solution, Stats, StepResult, Trace

# torchsde._core.__init__ does not shadow these, but import them as modules explicitly.
_methods = importlib.import_module("torchsde._core.methods")
_sdeint_mod = importlib.import_module("torchsde._core.sdeint")
_adjoint_mod = importlib.import_module("torchsde._core.adjoint")

_ORIGINAL_SELECT: Callable[..., Any] = _methods.select

#: Methods regnde runs adaptively: every torchsde method but ``adjoint_reversible_heun``, which
#: only exists as the backward solver of ``reversible_heun`` under the adjoint.
METHOD_NAMES: tuple[str, ...] = tuple(m for m in METHODS.all()
                                      if m != METHODS.adjoint_reversible_heun)
#: Methods whose solver refuses the adjoint SDE (srk.py:46, log_ode.py:32): no ``adjoint_method``.
ADJOINT_REFUSED = (METHODS.srk, METHODS.log_ode_midpoint)
#: Noise type of the adjoint SDE by noise type of the forward one (adjoint_sde.py:36).
ADJOINT_NOISE = {NOISE_TYPES.general: NOISE_TYPES.general,
                 NOISE_TYPES.additive: NOISE_TYPES.general,
                 NOISE_TYPES.scalar: NOISE_TYPES.scalar,
                 NOISE_TYPES.diagonal: NOISE_TYPES.diagonal}
#: torchsde's keyword arguments of ``sdeint`` (and the extra ones of ``sdeint_adjoint``).
SDE_OPTIONS = ("bm", "dt", "adaptive", "dt_min", "options", "names", "logqp", "extra",
               "extra_solver_state")
ADJOINT_OPTIONS = ("adjoint_method", "adjoint_adaptive", "adjoint_rtol", "adjoint_atol",
                   "adjoint_options", "adjoint_params")
_SDEINT_DEFAULTS = {k: p.default for k, p in
                    inspect.signature(_sdeint_mod.sdeint).parameters.items()}
DEFAULT_DT: float = _SDEINT_DEFAULTS["dt"]
DEFAULT_DT_MIN: float = _SDEINT_DEFAULTS["dt_min"]
#: ``eps`` of ``adaptive_stepping.compute_error`` (the floor of tolerances and of the error).
ERROR_EPS: float = inspect.signature(adaptive_stepping.compute_error).parameters["eps"].default
#: The key stream that seeds the Brownian motion (samplers use the key itself or ``fold(i)``).
BROWNIAN_STREAM = 0x5DE


# -- the step-doubling error, as torchsde's controller computes it ----------------------------
def scaled_error(y_full: torch.Tensor, y_half: torch.Tensor, rtol: Any, atol: Any
                 ) -> torch.Tensor:
    """``adaptive_stepping.compute_error`` (adaptive_stepping.py:42) without ``no_grad``.

    ``y_full``: one full step, ``y_half``: two half steps, both ``(batch, d)``. Returns the
    scalar error the controller compares with 1, differentiable w.r.t. both; ``float`` of it is
    bit-identical to torchsde's value.
    """
    tol = (rtol * torch.max(torch.abs(y_full), torch.abs(y_half)) + atol).clamp_min(ERROR_EPS)
    return adaptive_stepping._rms([(y_full - y_half) / tol], ERROR_EPS)


def _with_gradient(error: torch.Tensor, y_full: torch.Tensor, y_half: torch.Tensor, rtol: Any,
                   atol: Any) -> torch.Tensor:
    """``error`` (``(N,)``, torchsde's values) with the gradient of :func:`scaled_error` for
    ``N`` steps at once (``y_full``, ``y_half``: ``(N, batch, d)``): one batched graph instead
    of one per step. The values stay bit-identical to the controller's; the batched sum may
    round differently, so only its gradient is used."""
    tol = (rtol * torch.max(torch.abs(y_full), torch.abs(y_half)) + atol).clamp_min(ERROR_EPS)
    x = (y_full - y_half) / tol
    rms = torch.linalg.vector_norm(x.flatten(1), dim=1) / math.sqrt(x[0].numel())
    batched = rms.clamp_min(ERROR_EPS)
    return batched + (error - batched).detach()


def double_step(solver: Any, t0: torch.Tensor, t1: torch.Tensor, y: torch.Tensor,
                extra: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, torch.Tensor]:
    """One adaptive-style step as ``BaseSDESolver.integrate`` takes it (base_solver.py:116).

    Returns ``(y_full, y_mid, y_half, extra_half, error)``: the full step, the first half step,
    the two half steps (the state torchsde accepts), the solver's extra state after them, and
    :func:`scaled_error`. All on the solver's Brownian motion; differentiable w.r.t. ``y`` and
    the SDE's parameters.
    """
    y_full, _ = solver.step(t0, t1, y, extra)
    tm = 0.5 * (t0 + t1)
    y_mid, extra_mid = solver.step(t0, tm, y, extra)
    y_half, extra_half = solver.step(tm, t1, y_mid, extra_mid)
    return y_full, y_mid, y_half, extra_half, scaled_error(y_full, y_half, solver.rtol,
                                                           solver.atol)


# -- counting drift evaluations ----------------------------------------------------------------
_ROLES = ("f", "g", "h", "g_prod", "f_and_g", "f_and_g_prod")
_DRIFT_ROLES = {"drift": "f", "drift_and_diffusion": "f_and_g",
                "drift_and_diffusion_prod": "f_and_g_prod"}


class CountingSDE:
    """The user's SDE with its drift calls counted (``n``); torchsde sees the same methods."""

    def __init__(self, sde: Any, names: Mapping[str, str] | None = None):
        names = dict(names or {})
        self.sde = sde
        self.noise_type = sde.noise_type
        self.sde_type = sde.sde_type
        self.n = 0
        drift = {names.get(role, default) for role, default in _DRIFT_ROLES.items()}
        plain_drift = names.get("drift", "f")
        for name in {*_ROLES, *names.values()}:
            fn = getattr(sde, name, None)
            if callable(fn):
                setattr(self, name, self._counted(fn, name == plain_drift)
                        if name in drift else fn)

    def _counted(self, fn: Callable[..., Any], check: bool) -> Callable[..., Any]:
        def call(t: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
            self.n += 1
            out = fn(t, y, *args, **kwargs)
            if check and self.n == 1:  # the drift's first value, shaped like the state
                check_field_output(out, y)
            return out

        return call


# -- recording ---------------------------------------------------------------------------------
class Recorder:
    """Collects one solve's accepted steps (in torchsde's own time, which increases)."""

    def __init__(self, solver: Any, *, max_steps: int | None, keep_states: bool, full: bool,
                 probes: Mapping[int, torch.Tensor], error_grad: bool = True):
        self.solver, self.error_grad = solver, error_grad
        self.max_steps, self.keep_states, self.full = max_steps, keep_states, full
        self.probes = dict(probes)
        self.captured: dict[int, torch.Tensor] = {}
        self.ts: list[torch.Tensor] = []
        self.dts: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.errors: list[torch.Tensor] = []
        self.fulls: list[torch.Tensor] = []
        self.halves: list[torch.Tensor] = []
        self.attempts = 0
        self.rejected = 0
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
            error = _with_gradient(error, torch.stack(self.fulls), torch.stack(self.halves),
                                   self.solver.rtol, self.solver.atol)
        self.fulls, self.halves = [], []
        return Trace(t=t, dt=torch.stack(self.dts),
                     mask=torch.ones(n, dtype=torch.bool, device=t.device), n_steps=n,
                     error=error, stiffness=None,
                     y=torch.stack(self.ys) if self.full else None)


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


_SDEINT_ADJOINT = _adjoint_mod.sdeint_adjoint.__code__


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
                         error_grad=not _only_local(reg))
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
    return _recording_class(_ORIGINAL_SELECT(method, sde_type))


def _install() -> None:
    setattr(_methods, "select", _select)  # noqa: B010


def _restore() -> None:
    setattr(_methods, "select", _ORIGINAL_SELECT)  # noqa: B010


#: ``torchsde._core.methods.select`` returns recording subclasses while a solve is open.
SCOPE = RecordingScope(_install, _restore)
register_scope(SCOPE)


class _SolveContext:
    """One :func:`regnde.solve` call: records the first solver torchsde constructs."""

    def __init__(self, *, max_steps: int, keep_states: bool, full: bool,
                 probes: Mapping[int, torch.Tensor], error_grad: bool = True):
        self.max_steps, self.keep_states, self.full = max_steps, keep_states, full
        self.error_grad = error_grad
        self.probes = probes
        self.recorder: Recorder | None = None

    def recorder_for(self, solver: Any) -> Recorder | None:
        if self.recorder is not None:
            return None
        self.recorder = Recorder(solver, max_steps=self.max_steps, keep_states=self.keep_states,
                                 full=self.full, probes=self.probes,
                                 error_grad=self.error_grad)
        return self.recorder


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
        return _step_result(self.solver, tau, end, y)

    def initial_dt(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """torchsde has no initial step selection: the ``dt`` option, clipped to ``t1 - tau``."""
        dt = torch.as_tensor(self.dt_option, dtype=tau.dtype, device=tau.device)
        return torch.minimum(dt, self.t1 - tau.detach())


def _step_result(solver: Any, t0: torch.Tensor, t1: torch.Tensor, y: torch.Tensor
                 ) -> StepResult:
    extra = solver.init_extra_solver_state(t0, y)
    y_full, y_mid, y_half, _, error = double_step(solver, t0, t1, y, extra)
    return StepResult(t=t0, dt=t1 - t0, y1=y_half, error=error, stiffness=None,
                      stages=torch.stack([y_full, y_mid, y_half]))


# -- checks ------------------------------------------------------------------------------------
def default_method(sde_type: str, noise_type: str) -> str:
    """torchsde's own default method (sdeint.py:144)."""
    if sde_type == SDE_TYPES.stratonovich:
        return METHODS.midpoint
    return METHODS.euler if noise_type == NOISE_TYPES.general else METHODS.srk


def _fits(method: str, sde_type: str, noise_type: str) -> bool:
    cls = _ORIGINAL_SELECT(method, sde_type)
    return bool(cls.sde_type == sde_type and noise_type in cls.noise_types)


def working_methods(sde_type: str, noise_type: str, adjoint: bool = False) -> list[str]:
    """Methods that solve an SDE of this type and noise type (as ``adjoint_method`` if
    ``adjoint``: then the adjoint SDE's noise type counts, and srk and log_ode refuse)."""
    if adjoint:
        noise_type = ADJOINT_NOISE[noise_type]
    return [m for m in METHOD_NAMES if _fits(m, sde_type, noise_type)
            and not (adjoint and m in ADJOINT_REFUSED)]


def levy_area(method: str) -> str:
    """The Levy area torchsde's default Brownian motion computes for ``method`` (sdeint.py:258)."""
    if method == METHODS.srk:
        return LEVY_AREA_APPROXIMATIONS.space_time
    if method == METHODS.log_ode_midpoint:
        return LEVY_AREA_APPROXIMATIONS.foster
    return LEVY_AREA_APPROXIMATIONS.none


def check_sde(sde: Any) -> None:
    for attr, valid in (("noise_type", NOISE_TYPES.all()), ("sde_type", SDE_TYPES.all())):
        value = getattr(sde, attr, None)
        if value not in valid:
            raise ValueError(
                f"the SDE's {attr} is {value!r}; torchsde needs one of {', '.join(valid)}. "
                f"Set sde.{attr} (torchsde.SDEIto / SDEStratonovich set sde_type)."
            )
    if not any(callable(getattr(sde, n, None)) for n in ("f", "f_and_g", "f_and_g_prod")):
        raise ValueError(f"the SDE {type(sde).__name__} has no drift: define f(t, y).")


def check_method(method: str, sde_type: str, noise_type: str) -> None:
    if not _fits(method, sde_type, noise_type):
        ok = working_methods(sde_type, noise_type)
        raise ValueError(
            f"method {method!r} of backend 'torchsde' does not solve {sde_type} SDEs with "
            f"{noise_type} noise; methods that do: {', '.join(ok)}."
        )


def check_adjoint(method: str, options: Mapping[str, Any], sde_type: str, noise_type: str,
                  adaptive: bool) -> None:
    """Reject adjoint methods torchsde would only refuse in the backward pass."""
    given = options.get("adjoint_method")
    if given is None:
        probe = SimpleNamespace(noise_type=noise_type, sde_type=sde_type)
        adjoint_method = _adjoint_mod._select_default_adjoint_method(probe, method, None)
    else:
        adjoint_method = given
    ok = working_methods(sde_type, noise_type, adjoint=True)
    if adjoint_method == METHODS.adjoint_reversible_heun:
        if method != METHODS.reversible_heun:
            raise ValueError(
                f"adjoint_method='adjoint_reversible_heun' is the backward solver of "
                f"method='reversible_heun' only, got method={method!r}; adjoint methods that "
                f"work here: {', '.join(ok)}."
            )
        if adaptive:
            raise ValueError(
                "method='reversible_heun' with sensitivity='adjoint' uses its algebraically "
                "reversible adjoint, which does not save adaptive steps (torchsde warns its "
                "gradients are then inaccurate). Pass adjoint_method= one of "
                f"{', '.join(ok)}, or adaptive=False (no error regularizers then)."
            )
        return
    if adjoint_method not in ok:
        why = ("refuses the adjoint SDE (it needs the diffusion itself)"
               if adjoint_method in ADJOINT_REFUSED else
               f"does not solve the adjoint SDE ({sde_type}, "
               f"{ADJOINT_NOISE[noise_type]} noise)")
        raise ValueError(
            f"adjoint_method {adjoint_method!r} {why}; adjoint methods that work here: "
            f"{', '.join(ok)}. Pass adjoint_method=... or use sensitivity='direct'."
        )


def check_options(options: Mapping[str, Any], sensitivity: str) -> None:
    allowed = SDE_OPTIONS + (ADJOINT_OPTIONS if sensitivity == "adjoint" else ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        own = {"rtol", "atol", "method", "max_steps", "key"} & set(unknown)
        hint = (f" {sorted(own)} are keywords of regnde.solve itself." if own else "")
        adj = sorted(set(unknown) & set(ADJOINT_OPTIONS))
        if adj:
            hint += f" {adj} need sensitivity='adjoint'."
        raise ValueError(
            f"unknown torchsde option(s) {unknown} for sensitivity={sensitivity!r}; allowed: "
            f"{', '.join(allowed)}.{hint}"
        )


def check_state_shape(y0: torch.Tensor) -> None:
    if y0.dim() != 2:
        raise ValueError(
            f"torchsde needs y0 of shape (batch, d), got shape {tuple(y0.shape)}; reshape it, "
            f"e.g. y0.reshape(1, -1) for a single state."
        )


def noise_channels(sde: Any, names: Mapping[str, str], y0: torch.Tensor, t0: torch.Tensor
                   ) -> int:
    """Brownian channels ``m``; checks the diffusion's shape (one evaluation, no gradient)."""
    g_fn = getattr(sde, names.get("diffusion", "g"), None)
    fg_fn = getattr(sde, names.get("drift_and_diffusion", "f_and_g"), None)
    if not callable(g_fn) and not callable(fg_fn):
        return y0.shape[1]  # only products given: torchsde checks them (and needs bm)
    with torch.no_grad():
        g = g_fn(t0, y0) if callable(g_fn) else fg_fn(t0, y0)[1]  # type: ignore[misc]
    b, d = y0.shape
    noise = sde.noise_type
    if noise == NOISE_TYPES.diagonal:
        if tuple(g.shape) != (b, d):
            raise ValueError(
                f"the diffusion g(t, y) of an SDE with diagonal noise must have the shape of y, "
                f"(batch, d) = {(b, d)}; got {tuple(g.shape)}. Return one entry per state, or "
                f"set noise_type='general' for a (batch, d, m) diffusion matrix."
            )
        return d
    m_hint = "1" if noise == NOISE_TYPES.scalar else "m"
    if g.dim() != 3 or tuple(g.shape[:2]) != (b, d) or (noise == NOISE_TYPES.scalar
                                                        and g.shape[2] != 1):
        raise ValueError(
            f"the diffusion g(t, y) of an SDE with {noise} noise must have shape "
            f"(batch, d, {m_hint}) = ({b}, {d}, {m_hint}); got {tuple(g.shape)}. For one noise "
            f"channel per state use noise_type='diagonal' and shape (batch, d)."
        )
    return int(g.shape[2])


def _only_local(regularizer: Any) -> bool:
    """Whether every term takes its own extra step (and never reads ``trace.error``)."""
    return regularizer is not None and all(
        isinstance(r, (LocalError, LocalStiffness)) for _, r in regularizer.terms())


def _uses_error(regularizer: Any) -> bool:
    return any(isinstance(r, (GlobalError, LocalError)) for _, r in regularizer.terms())


def brownian_interval(key: TorchKey, t: torch.Tensor, size: tuple[int, ...], like: torch.Tensor,
                      method: str) -> BrownianInterval:
    """The Brownian motion for ``key``: torchsde's default ``BrownianInterval`` over
    ``[t[0], t[-1]]`` with an entropy drawn from ``key.fold(BROWNIAN_STREAM)``."""
    u = key.fold(BROWNIAN_STREAM).uniform(torch.zeros((), dtype=torch.float64))
    entropy = int(float(u) * 2**53)
    return BrownianInterval(t0=t[0], t1=t[-1], size=size, dtype=like.dtype, device=like.device,
                            entropy=entropy, levy_area_approximation=levy_area(method))


def _renamed(sde: Any, names: Mapping[str, str] | None) -> Any:
    return base_sde.RenameMethodsSDE(sde, **names) if names else sde


# -- the backend -------------------------------------------------------------------------------
class TorchsdeBackend(Backend):
    """``backend="torchsde"``: ``sdeint`` (direct) and ``sdeint_adjoint`` (adjoint)."""

    name = "torchsde"
    framework = "torch"
    runs_tableaus = False
    sde = True
    default_method = None
    default_for = ("sde",)
    install_hint = builtin(__name__).install
    distributed = "regnde.adapters.torch.distributed"

    def native_methods(self) -> Mapping[str, Tableau | None]:
        return dict.fromkeys(METHOD_NAMES)

    def regularize(self, regularizer: Any, key: Any = None, trace: str = "summary",
                   max_steps: int | None = None) -> Block:
        """The drop-in block (shared by the torch host libraries)."""
        return Block(regularizer, key=key, trace=trace, max_steps=max_steps)

    def owns(self, y0: Any) -> bool:
        return isinstance(y0, torch.Tensor)

    def make_key(self, key: Any) -> TorchKey:
        return make_key(key)

    def solve(self, request: SolveRequest) -> Solution:
        r = request
        sde, y0, t = r.f, r.y0, r.t
        check_sde(sde)
        options = dict(r.options)
        check_options(options, r.sensitivity)
        options.setdefault("adaptive", True)
        adaptive = bool(options["adaptive"])
        if r.regularizer is not None and not adaptive and _uses_error(r.regularizer):
            raise ValueError(
                f"{r.regularizer!r} needs torchsde's step-doubling error estimate, which exists "
                f"only with adaptive=True (regnde's default for torchsde); drop adaptive=False."
            )
        check_state_shape(y0)
        if bool(t[-1] < t[0]):
            raise ValueError("torchsde solves forward in time only: pass increasing t.")
        key = make_key(r.key)
        names = options.get("names") or {}
        method = r.method or default_method(sde.sde_type, sde.noise_type)
        check_method(method, sde.sde_type, sde.noise_type)
        if r.sensitivity == "adjoint":
            check_adjoint(method, options, sde.sde_type, sde.noise_type, adaptive)
            if "adjoint_params" not in options:
                if not isinstance(sde, torch.nn.Module):
                    raise ValueError(
                        "sensitivity='adjoint' needs the SDE to be a torch.nn.Module (its "
                        "parameters get gradients), or pass adjoint_params=(...) explicitly."
                    )
                options["adjoint_params"] = tuple(sde.parameters())
        m = noise_channels(sde, names, y0, t[0])
        if options.get("logqp") and sde.noise_type == NOISE_TYPES.diagonal:
            m += 1  # torchsde appends the log-ratio channel to the state (sdeint.py:139)
        if options.get("bm") is None:
            options["bm"] = brownian_interval(key, t, (y0.shape[0], m), y0, method)

        reg = r.regularizer
        plan = Plan(reg, key, t[0], t[-1], r.trace)
        ctx = _SolveContext(max_steps=r.max_steps, keep_states=plan.keep_states,
                            full=r.trace == "full", probes=plan.probes,
                            error_grad=not _only_local(reg))
        counting = CountingSDE(sde, names)
        fn = _adjoint_mod.sdeint_adjoint if r.sensitivity == "adjoint" else _sdeint_mod.sdeint
        with SCOPE.opened(ctx):
            out = fn(counting, y0, t, method=r.method or None, rtol=r.rtol, atol=r.atol,
                     **options)
        rec = ctx.recorder
        assert rec is not None, "torchsde did not run a regnde solver"
        ys, rest = (out[0], list(out[1:])) if isinstance(out, tuple) else (out, [])

        trace = rec.trace()
        stats = Stats(nfe=counting.n, nfe_reg=0, n_steps=trace.n_steps, n_rejected=rec.rejected)
        value = None
        if reg is not None:
            run = SdeRun(rec, trace, t[0].detach(), t[-1].detach(), r.sensitivity,
                         options.get("dt", DEFAULT_DT))
            value, stats.nfe_reg = regularize(plan, run, lambda: counting.n)
        rec.solver = None
        if r.trace != "full":
            rec.ys = []
        extras = {}
        if options.get("logqp"):
            extras["logqp"] = rest.pop(0)
        if options.get("extra"):
            extras["extra_solver_state"] = rest.pop(0)
        return solution(ys, trace, stats, value, **extras)

    def step(self, request: StepRequest) -> StepResult:
        """One step (full and two halves on one Brownian path) from ``(t, y)``.

        Options: ``dt`` (used when ``dt=None``; torchsde has no initial step selection),
        ``bm`` (default: a ``BrownianInterval`` over the step seeded by the ``key`` option),
        ``names``, ``options``, ``dt_min``. ``y1`` is the two-half-step state torchsde accepts,
        ``stages`` the states ``(y_full, y_mid, y_half)``, ``stiffness`` ``None``.
        """
        r = request
        sde, y = r.f, r.y
        check_sde(sde)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"y must be a torch.Tensor on torchsde, got {type(y)}.")
        check_state_shape(y)
        options = dict(r.options)
        key = make_key(options.pop("key", None))
        unknown = sorted(set(options) - {"dt", "bm", "names", "options", "dt_min"})
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} of regnde.step on torchsde; allowed: "
                             f"dt, bm, key, names, options, dt_min.")
        names = options.get("names") or {}
        method = r.method or default_method(sde.sde_type, sde.noise_type)
        check_method(method, sde.sde_type, sde.noise_type)
        dt = r.dt if r.dt is not None else options.get("dt", DEFAULT_DT)
        t0 = torch.as_tensor(r.t, dtype=y.dtype, device=y.device).detach()
        dt_t = torch.as_tensor(dt, dtype=y.dtype, device=y.device).detach()
        if not bool(dt_t > 0):
            raise ValueError(f"torchsde steps forward in time only: dt must be > 0, got {dt}.")
        t1 = t0 + dt_t
        m = noise_channels(sde, names, y, t0)
        bm = options.get("bm")
        if bm is None:
            bm = brownian_interval(key, torch.stack([t0, t1]), (y.shape[0], m), y, method)
        fsde = base_sde.ForwardSDE(_renamed(sde, names))
        cls = _ORIGINAL_SELECT(method, sde.sde_type)
        solver = cls(sde=fsde, bm=bm, dt=float(dt_t), adaptive=True, rtol=r.rtol, atol=r.atol,
                     dt_min=options.get("dt_min", DEFAULT_DT_MIN),
                     options=dict(options.get("options") or {}))
        return _step_result(solver, t0, t1, y)


@hookimpl
def regnde_register_backends(register: Callable[[str, Any], None]) -> None:
    register("torchsde", TorchsdeBackend)
