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

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchsde._core import base_sde
from torchsde.settings import NOISE_TYPES

from regnde.adapters import builtin
from regnde.adapters.torch.common import TorchBackend
from regnde.adapters.torch.dropin import Block
from regnde.adapters.torch.keys import check_field_output, make_key
from regnde.adapters.torch.sde_checks import (
    DEFAULT_DT,
    DEFAULT_DT_MIN,
    METHOD_NAMES,
    ORIGINAL_SELECT,
    brownian_interval,
    check_adjoint,
    check_method,
    check_options,
    check_sde,
    check_state_shape,
    default_method,
    noise_channels,
    only_local,
    renamed,
    ts_adjoint,
    ts_sdeint,
    uses_error,
)
from regnde.adapters.torch.sde_recorder import Recorder, SdeRun
from regnde.adapters.torch.sde_solvers import SCOPE
from regnde.adapters.torch.sde_step import step_result
from regnde.backend import SolveRequest, StepRequest
from regnde.engine import Plan, regularize, solution
from regnde.plugins.hookspecs import hookimpl
from regnde.tableau import Tableau
from regnde.trace import Solution, Stats, StepResult

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


# -- the backend -------------------------------------------------------------------------------
class TorchsdeBackend(TorchBackend):
    """``backend="torchsde"``: ``sdeint`` (direct) and ``sdeint_adjoint`` (adjoint)."""

    name = "torchsde"
    runs_tableaus = False
    sde = True
    default_method = None
    default_for = ("sde",)
    install_hint = builtin(__name__).install

    def native_methods(self) -> Mapping[str, Tableau | None]:
        return dict.fromkeys(METHOD_NAMES)

    def regularize(self, regularizer: Any, key: Any = None, trace: str = "summary",
                   max_steps: int | None = None) -> Block:
        """The drop-in block (shared by the torch host libraries)."""
        return Block(regularizer, key=key, trace=trace, max_steps=max_steps)

    def solve(self, request: SolveRequest) -> Solution:
        r = request
        sde, y0, t = r.f, r.y0, r.t
        check_sde(sde)
        options = dict(r.options)
        check_options(options, r.sensitivity)
        options.setdefault("adaptive", True)
        adaptive = bool(options["adaptive"])
        if r.regularizer is not None and not adaptive and uses_error(r.regularizer):
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
                            error_grad=not only_local(reg))
        counting = CountingSDE(sde, names)
        fn = ts_adjoint.sdeint_adjoint if r.sensitivity == "adjoint" else ts_sdeint.sdeint
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
        fsde = base_sde.ForwardSDE(renamed(sde, names))
        cls = ORIGINAL_SELECT(method, sde.sde_type)
        solver = cls(sde=fsde, bm=bm, dt=float(dt_t), adaptive=True, rtol=r.rtol, atol=r.atol,
                     dt_min=options.get("dt_min", DEFAULT_DT_MIN),
                     options=dict(options.get("options") or {}))
        return step_result(solver, t0, t1, y)


@hookimpl
def regnde_register_backends(register: Callable[[str, Any], None]) -> None:
    register("torchsde", TorchsdeBackend)
