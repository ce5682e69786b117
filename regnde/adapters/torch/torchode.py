"""The torchode backend, a regnde plugin: ``backend="torchode"``, methods ``dopri5``, ``tsit5``.

torchode solves a batch of independent problems, each sample with its own steps. regnde runs
torchode's own ``AutoDiffAdjoint`` loop, step methods and controller (``IntegralController``;
``PIDController`` when ``pcoeff``/``icoeff``/``dcoeff`` are given), subclassed only to record:
the step method hands over each attempt's ``(t, dt, y, running, stages)``, the controller's
``update_state`` its own error ratio and acceptance. So ``ys`` are torchode's, value for value.
Differences from the other backends:

- ``y0`` is ``(batch, *features)``; ``f(t, y)`` receives ``t`` of shape ``(batch,)``, one time
  per sample (torchode's convention), and ``y`` of ``y0.shape``.
- The :class:`regnde.Trace` is in per-sample form: ``(batch, N)`` fields with a mask (see
  its docstring); regularizers average their per-sample values over the batch.
- :meth:`TorchodeRun.step` takes one ``tau``/``dt`` per sample (or one for all) and returns
  per-sample errors: torchode's step, the error scaled exactly as its controller does.
- ``stats.nfe`` (and ``nfe_reg``) count rows of ``f`` evaluated: torchode evaluates the whole
  batch on every call, finished samples included, so calls times batch size.
  ``stats.n_steps``/``n_rejected`` are ``(batch,)`` (steps while a sample was running).
- Only ``sensitivity="direct"``; no integral regularizers (extra states).
- Step sizes are constants for autodiff (regnde's convention on every backend, so that
  gradients equal a replay on the fixed grid of accepted steps): torchode's
  ``backprop_through_step_size_control`` defaults to ``False`` here, torchode's own default
  being ``True``. Pass ``backprop_through_step_size_control=True`` for torchode's gradients,
  which then also flow through the step-size controller.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchode
from torchode import IntegralController, ODETerm, PIDController, status_codes
from torchode.single_step_methods.runge_kutta import ERKState

from regnde import errors
from regnde.adapters import builtin
from regnde.adapters.torch.common import TorchBackend
from regnde.adapters.torch.keys import TorchKey, check_field_output, make_key
from regnde.backend import SolveRequest, StepRequest
from regnde.engine import Plan, regularize, solution
from regnde.plugins.hookspecs import hookimpl
from regnde.tableau import Tableau, equal_c_pair
from regnde.trace import Solution, Stats, StepResult, Trace

METHODS: dict[str, Any] = {"dopri5": torchode.Dopri5, "tsit5": torchode.Tsit5}
CONTROLLER_OPTIONS = ("norm", "dt_min", "dt_max", "safety", "factor_min", "factor_max")
PID_OPTIONS = ("pcoeff", "icoeff", "dcoeff")
SOLVER_OPTIONS = ("dt0", "backprop_through_step_size_control")


@functools.cache
def native_tableau(name: str) -> Tableau:
    """A :class:`Tableau` from torchode's coefficients (the values it runs)."""
    cls, tab = METHODS[name], METHODS[name].TABLEAU
    c = tuple(float(x) for x in tab.c)
    a = tuple(tuple(float(x) for x in tab.a[i, :i]) for i in range(len(c)))
    return Tableau(name, order=int(cls().convergence_order()), c=c, a=a,
                   b=tuple(float(x) for x in tab.b), b_error=tuple(float(x) for x in tab.b_err),
                   stiffness_pair=equal_c_pair(c))


class _Field:
    """``f`` as torchode calls it, on ``(batch, features)``; counts rows evaluated."""

    def __init__(self, f: Any, shape: torch.Size, check: bool = False):
        self.f, self.shape, self.check, self.rows = f, shape, check, 0

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.rows += y.shape[0]
        y_user = y.reshape(y.shape[0], *self.shape)
        out = self.f(t, y_user)
        if self.check:
            self.check = False
            check_field_output(out, y_user)
        return out.reshape(y.shape[0], -1)


class _Stepper:
    """One step of a torchode method with the controller's error scaling (local steps,
    dense output replays, :meth:`TorchodeBackend.step`)."""

    def __init__(self, method: Any, ctrl: Any, term: ODETerm, tab: Tableau, like: torch.Tensor):
        self.method, self.ctrl, self.term, self.tab = method, ctrl, term, tab
        self.erk = method.tableau.to(device=like.device, time_dtype=like.dtype,
                                     data_dtype=like.dtype)
        self.almost_zero = torch.tensor(1e-5 if like.dtype == torch.float16 else 1e-38,
                                        dtype=like.dtype, device=like.device)
        w = tab.stage_difference_weights()
        self.w = None if w is None else torch.tensor(w, dtype=like.dtype, device=like.device)

    def stiffness(self, k: torch.Tensor, dt: torch.Tensor) -> torch.Tensor | None:
        """Shampine's estimate per sample, ``k``: ``(stages, batch, features)``."""
        if self.w is None:
            return None
        p, q = self.tab.stiffness_pair  # type: ignore[misc]
        num = torch.linalg.vector_norm(k[p] - k[q], dim=-1)
        den = torch.linalg.vector_norm(torch.einsum("s,sbf->bf", self.w, k), dim=-1)
        return num / den.clamp_min(torch.finfo(den.dtype).tiny) / dt.abs().to(k.dtype)

    def step(self, t: torch.Tensor, y: torch.Tensor, dt: torch.Tensor, constant_f0: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Any]:
        """``(y1, error, stiffness, interpolation data)`` from ``(t, y)``, all ``(batch, ...)``."""
        f0 = self.term.vf(t, y, {}, None)
        if constant_f0:
            f0 = f0.detach()
        running = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
        result, data, _, _ = self.method.step(self.term, running, y, t, dt,
                                              ERKState(self.erk, f0), stats={}, args=None)
        c = self.ctrl  # the error ratio of IntegralController.adapt_step_size, op for op
        bounds = torch.add(c.atol, torch.maximum(y.abs(), result.y.abs()), alpha=c.rtol)
        error = torch.maximum(c.norm(result.error_estimate.abs() / bounds), self.almost_zero)
        return result.y, error, self.stiffness(data.k, dt), data

    def initial_dt(self, t: torch.Tensor, y: torch.Tensor, direction: torch.Tensor,
                   dt_max: torch.Tensor) -> torch.Tensor:
        h, _ = self.ctrl._select_initial_step(self.term, t, y, direction, dt_max,
                                              self.method.convergence_order(), {}, None)
        return (direction * torch.minimum(h.abs(), dt_max)).to(t.dtype).detach()


# -- recording -----------------------------------------------------------------------------------
class _RecordingStep:
    """torchode's step, plus handing the attempt to the recorder."""

    recorder: Any = None

    def step(self, term: Any, running: Any, y0: Any, t0: Any, dt: Any, state: Any, *,
             stats: Any, args: Any) -> Any:
        out = super().step(term, running, y0, t0, dt, state,  # type: ignore[misc]
                           stats=stats, args=args)
        if self.recorder is not None:
            self.recorder.last = (running, t0, dt, y0, out[1])
        return out


class _RecordingController:
    """torchode's controller; ``update_state`` sees its error ratio and acceptance."""

    recorder: Any = None

    def update_state(self, state: Any, y0: Any, dt: Any, error_ratio: Any, accept: Any) -> Any:
        if self.recorder is not None and error_ratio is not None:
            self.recorder.decided(error_ratio, accept)
        return super().update_state(state, y0, dt, error_ratio, accept)  # type: ignore[misc]


_RECORDING = {name: type(f"Recording{cls.__name__}", (_RecordingStep, cls), {})
              for name, cls in METHODS.items()}
_RECORDING.update({cls.__name__: type(f"Recording{cls.__name__}", (_RecordingController, cls), {})
                   for cls in (IntegralController, PIDController)})


class Recorder:
    """One solve's attempts; :meth:`end` packs the accepted ones per sample."""

    def __init__(self, stepper: _Stepper, r: SolveRequest, key: TorchKey, t_start: torch.Tensor):
        self.stepper, self.request, self.key = stepper, r, key
        self.t0, self.t1 = r.t[0].detach(), r.t[-1].detach()
        self.plan = Plan(r.regularizer, key, self.t0, self.t1, r.trace)
        self.keep_states, self.probes = self.plan.keep_states, self.plan.probes
        self.presampled = self.plan.presampled
        self.captured: dict[int, torch.Tensor] = {}
        self.found: dict[int, torch.Tensor] = {}
        self.t_now = t_start.detach()
        self.cols: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("t", "dt", "y", "error", "stiff", "acc", "rej")}
        self.last: tuple[Any, ...] = ()  # the step method's latest attempt

    def decided(self, error: torch.Tensor, accept: torch.Tensor) -> None:
        running, t0, dt, y0, data = self.last
        acc, c = accept & running, self.cols
        for name, x in (("t", t0.detach()), ("dt", dt.detach()), ("error", error), ("acc", acc),
                        ("rej", running & ~accept)):
            c[name].append(x)
        if self.keep_states:
            c["y"].append(y0 if self.request.trace == "full" else y0.detach())
        # finished samples step by dt = 0: divide by 1 there (no NaN in their zero gradient)
        stiff = self.stepper.stiffness(data.k, torch.where(acc, dt.detach(), 1.0))
        if stiff is not None:
            c["stiff"].append(stiff)
        t1 = t0 + dt
        self.t_now = torch.where(acc, t1, self.t_now).detach()  # as torchode advances t
        for pid, tau in self.probes.items():
            found = self.found.get(pid, torch.zeros_like(acc))
            hit = acc & ~found & (torch.minimum(t0, t1) <= tau) & (tau <= torch.maximum(t0, t1))
            if bool(hit.any()):
                idx = hit.nonzero()[:, 0]
                u = self.stepper.method.build_interpolation(data).evaluate(
                    tau.expand(len(idx)), idx)
                prev = self.captured.get(pid, torch.zeros_like(y0))
                self.captured[pid] = prev.index_put((idx,), u)
                self.found[pid] = found | hit

    def end(self, shape: torch.Size) -> None:
        c = self.cols
        acc = torch.stack(c["acc"], 1)  # (batch, attempts)
        batch = acc.shape[0]
        self.n = acc.sum(1)
        n_max = int(self.n.max())
        b, i = acc.nonzero(as_tuple=True)
        p = (acc.cumsum(1) - 1)[b, i]

        def pack(xs: list[torch.Tensor]) -> torch.Tensor:
            x = torch.stack(xs, 1)
            return x.new_zeros((batch, n_max, *x.shape[2:])).index_put((b, p), x[b, i])

        self.t, self.dt = pack(c["t"]), pack(c["dt"])
        self.ys = pack(c["y"]) if self.keep_states else None
        mask = torch.arange(n_max, device=acc.device) < self.n[:, None]
        full = self.request.trace == "full" and self.ys is not None
        self.trace = Trace(
            t=self.t, dt=self.dt, mask=mask, n_steps=self.n, error=pack(c["error"]),
            stiffness=pack(c["stiff"]) if c["stiff"] else None,
            y=self.ys.reshape(batch, n_max, *shape) if full else None,  # type: ignore[union-attr]
        )
        self.stats = Stats(n_steps=self.n, n_rejected=torch.stack(c["rej"], 1).sum(1))


class TorchodeRun:
    """The :class:`regnde.backend.Run` of a torchode solve (per-sample trace)."""

    sensitivity = "direct"

    def __init__(self, rec: Recorder, shape: torch.Size):
        self.rec, self.shape, self.stepper = rec, shape, rec.stepper
        self.trace, self.tableau = rec.trace, rec.stepper.tab
        self.t0, self.t1 = rec.t0, rec.t1
        self.batch = rec.trace.t.shape[0]

    def _per_sample(self, x: Any) -> torch.Tensor:
        return _per_sample(x, self.batch, self.t0)

    def state_at(self, tau: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        u = self.rec.captured.get(id(tau))
        if u is None:
            u = self._from_trace(self._per_sample(tau))
        u = u.reshape(self.batch, *self.shape)
        return u if differentiable else u.detach()

    def _from_trace(self, tau: torch.Tensor) -> torch.Tensor:
        from regnde.regularizers import containing_step

        rec = self.rec
        if rec.ys is None:
            raise ValueError("torchode: the state at a sampled time needs recorded states; "
                             "solve with trace='full'.")
        j = containing_step(self, tau)
        rows = torch.arange(self.batch, device=tau.device)
        t0, dt, y0 = rec.t[rows, j], rec.dt[rows, j], rec.ys[rows, j]
        if bool((t0 == tau).all()):  # the biased sampler: step starts, no replay
            return y0
        _, _, _, data = self.stepper.step(t0, y0, dt)
        return self.stepper.method.build_interpolation(data).evaluate(tau, rows)

    def step(self, tau: torch.Tensor, y: torch.Tensor, dt: torch.Tensor,
             first_stage: str = "differentiable") -> StepResult:
        out = self.stepper.step(self._per_sample(tau), y.reshape(self.batch, -1),
                                self._per_sample(dt), constant_f0=first_stage == "constant")
        return _result(tau, dt, y, out)

    def initial_dt(self, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_b = self._per_sample(tau)
        direction = torch.where(self.t1 > self.t0, 1, -1).expand(self.batch)
        return self.stepper.initial_dt(t_b, y.reshape(self.batch, -1).detach(), direction,
                                       (self.t1 - t_b).abs())

    def integral(self, reg: Any) -> torch.Tensor:
        raise ValueError(f"{reg!r}: backend 'torchode' carries no extra states.")


# -- the backend ---------------------------------------------------------------------------------
def _per_sample(x: Any, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A constant ``(batch,)`` time or step size from a scalar or one per sample."""
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device).detach()
    return x.expand(batch) if x.ndim == 0 else x.reshape(batch)


def _result(t: Any, dt: Any, y: torch.Tensor, out: tuple[Any, ...]) -> StepResult:
    y1, error, stiff, data = out
    return StepResult(t=t, dt=dt, y1=y1.reshape(y.shape), error=error, stiffness=stiff,
                      stages=data.k.reshape(data.k.shape[0], *y.shape))

def _check(y0: Any, options: Mapping[str, Any]) -> None:
    if not isinstance(y0, torch.Tensor) or y0.ndim < 2:
        shape = tuple(y0.shape) if isinstance(y0, torch.Tensor) else type(y0).__name__
        raise ValueError(f"torchode solves a batch of independent problems: y0 must be a tensor "
                         f"of shape (batch, *features), got {shape}; add a batch axis "
                         f"(y0[None]) for a single problem.")
    allowed = (*CONTROLLER_OPTIONS, *PID_OPTIONS, *SOLVER_OPTIONS)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown torchode option(s) {unknown}; allowed: {', '.join(allowed)}. "
                         f"(regnde's own arguments such as rtol or max_steps are keywords of "
                         f"solve.)")


def _controller(rtol: Any, atol: Any, options: Mapping[str, Any], term: ODETerm,
                recording: bool) -> Any:
    kw = {k: options[k] for k in CONTROLLER_OPTIONS if k in options}
    pid = {k: options[k] for k in PID_OPTIONS if k in options}
    tols = {"atol": float(atol), "rtol": float(rtol), "term": term}
    if pid:  # torchode's PID controller; unset coefficients of a pure I controller
        pid = {"pcoeff": 0.0, "icoeff": 1.0, "dcoeff": 0.0, **pid}
    cls = PIDController if pid else IntegralController
    return (_RECORDING[cls.__name__] if recording else cls)(**tols, **pid, **kw)


def _check_status(status: torch.Tensor, rec: Recorder, r: SolveRequest) -> None:
    # torchode flags max_steps even for a sample that finished on its last allowed step
    unfinished = (rec.t_now - rec.t1) * torch.sign(rec.t1 - rec.t0) < 0
    bad = (status != 0) & (unfinished | (status != status_codes.REACHED_MAX_STEPS))
    if not bool(bad.any()):
        return
    b = int(bad.nonzero()[0, 0])
    code, t = int(status[b]), float(rec.t_now[b])
    if code == status_codes.REACHED_MAX_STEPS:
        raise errors.MaxStepsExceeded(errors.max_steps_exceeded(r.max_steps, t, float(rec.t1),
                                                                r.rtol, r.atol))
    if code == status_codes.INFINITE_NORM:
        raise errors.NonFiniteError(errors.non_finite_f(t))
    if code == status_codes.REACHED_DT_MIN:
        raise errors.StepSizeUnderflow(errors.underflow(t, float(rec.cols["dt"][-1][b])))
    raise RuntimeError(f"torchode stopped sample {b} at t={t:.6g} with status {code}.")


class TorchodeBackend(TorchBackend):
    """``backend="torchode"``: torchode's ``AutoDiffAdjoint`` (direct sensitivity only)."""

    name = "torchode"
    sensitivities = ("direct",)
    runs_tableaus = False
    per_sample_steps = True
    install_hint = builtin(__name__).install

    def native_methods(self) -> Mapping[str, Tableau | None]:
        return {name: native_tableau(name) for name in METHODS}

    def _method(self, method: str) -> Any:
        if method not in METHODS:
            raise ValueError(errors.choices("method of backend 'torchode'", method, METHODS))
        return METHODS[method]

    def solve(self, request: SolveRequest) -> Solution:
        r, key, _ = request, make_key(request.key), self._method(request.method)
        _check(r.y0, r.options)
        if not callable(r.f):
            raise ValueError(f"f must be a callable f(t, y) returning dy/dt, got {r.f!r}.")
        y0, shape, batch = r.y0, r.y0.shape[1:], r.y0.shape[0]
        field = _Field(r.f, shape, check=True)
        term = ODETerm(field)
        method = _RECORDING[r.method](term=term)
        ctrl = _controller(r.rtol, r.atol, r.options, term, recording=True)
        adjoint = torchode.AutoDiffAdjoint(method, ctrl, max_steps=r.max_steps,
                                           backprop_through_step_size_control=r.options.get(
                                               "backprop_through_step_size_control", False))
        t_eval = r.t[None].expand(batch, -1)  # as torchode.solve_ivp
        problem = torchode.InitialValueProblem(y0.reshape(batch, -1), t_eval[:, 0],
                                               t_eval[:, -1], t_eval)
        dt0 = None if "dt0" not in r.options else _per_sample(r.options["dt0"], batch, r.t)
        reg_field = _Field(r.f, shape)
        stepper = _Stepper(method, ctrl, ODETerm(reg_field, with_stats=False),
                           native_tableau(r.method), y0)
        rec = Recorder(stepper, r, key, t_eval[:, 0])
        method.recorder = ctrl.recorder = rec
        try:
            sol = adjoint.solve(problem, term, dt0=dt0)
        finally:
            method.recorder = ctrl.recorder = None
        _check_status(sol.status, rec, r)
        rec.end(shape)
        rec.stats.nfe = field.rows
        # the regularizer's steps run on reg_field: counted as nfe_reg
        value, rec.stats.nfe_reg = regularize(rec.plan, TorchodeRun(rec, shape),
                                              lambda: reg_field.rows)
        ys = sol.ys.transpose(0, 1).reshape(len(r.t), *y0.shape)
        return solution(ys, rec.trace, rec.stats, value)

    def step(self, request: StepRequest) -> StepResult:
        r = request
        cls = self._method(r.method)
        _check(r.y, r.options)
        y, batch = r.y, r.y.shape[0]
        term = ODETerm(_Field(r.f, y.shape[1:]), with_stats=False)
        ctrl = _controller(r.rtol, r.atol, r.options, term, recording=False)
        stepper = _Stepper(cls(term=term), ctrl, term, native_tableau(r.method), y)
        t, y2 = _per_sample(r.t, batch, y), y.reshape(batch, -1)
        if r.dt is None:  # forward in time, unbounded
            dt = stepper.initial_dt(t, y2.detach(), torch.ones_like(t, dtype=torch.long),
                                    torch.full_like(t, torch.inf))
        else:
            dt = _per_sample(r.dt, batch, y)
        return _result(r.t, dt, y, stepper.step(t, y2, dt))


@hookimpl
def regnde_register_backends(register: Callable[[str, Any], None]) -> None:
    register("torchode", TorchodeBackend)
