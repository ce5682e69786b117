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
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver

from regnde.adapters import builtin
from regnde.adapters.torch.common import TorchBackend
from regnde.adapters.torch.dropin import Block
from regnde.adapters.torch.keys import TorchKey, make_key
from regnde.adapters.torch.td_recorder import Layout, Recorder
from regnde.adapters.torch.td_solvers import SCOPE, tableau_solver
from regnde.adapters.torch.td_tableau import (
    ALIASES,
    NATIVE,
    ORIGINAL,
    device_tableau,
    diff_weights,
    native_tableau,
    rk_step,
    td_adjoint,
    td_method_name,
    td_misc,
    td_odeint,
)
from regnde.backend import SolveRequest, StepRequest
from regnde.engine import solution
from regnde.plugins.hookspecs import hookimpl
from regnde.tableau import Tableau
from regnde.trace import Solution, StepResult

#: torchdiffeq's own solver arguments (anything else in ``options`` is an error).
SOLVER_OPTIONS = ("first_step", "min_step", "max_step", "step_t", "jump_t", "safety", "ifactor",
                  "dfactor", "max_num_steps", "dtype", "norm")
ADJOINT_OPTIONS = ("adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options",
                   "adjoint_params")


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
class TorchdiffeqBackend(TorchBackend):
    """``backend="torchdiffeq"``: ``odeint`` (direct) and ``odeint_adjoint`` (adjoint)."""

    name = "torchdiffeq"
    augments = True
    default_for = ("ode",)
    install_hint = builtin(__name__).install

    @functools.cached_property
    def _native(self) -> Mapping[str, Tableau | None]:
        return {name: native_tableau(name) for name in NATIVE}

    def native_methods(self) -> Mapping[str, Tableau | None]:
        return self._native

    def aliases(self) -> Mapping[str, str]:
        return ALIASES

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
                ys = td_adjoint.odeint_adjoint(func, y0, r.t, rtol=r.rtol, atol=r.atol,
                                                method=method, options=options, **adjoint_kw)
            else:
                ys = td_odeint.odeint(func, y0, r.t, rtol=r.rtol, atol=r.atol, method=method,
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
        cls: Any = ORIGINAL[NATIVE[r.method]] if r.method in NATIVE else tableau_solver(tab)
        td = device_tableau(cls.tableau, y)
        norm = r.options.get("norm", td_misc._rms_norm)
        rtol = torch.as_tensor(r.rtol, dtype=t_dtype, device=y.device)
        atol = torch.as_tensor(r.atol, dtype=t_dtype, device=y.device)
        forward = td_misc._PerturbFunc(r.f)
        if r.dt is None:
            f0 = forward(t, y)
            dt = r.options.get("first_step")
            if dt is None:
                dt = td_misc._select_initial_step(forward, t, y, cls.order - 1, rtol, atol,
                                                   norm, f0=f0)
            dt = torch.as_tensor(dt, dtype=t_dtype, device=y.device).detach()
            sign = 1.0
        else:
            dt = torch.as_tensor(r.dt, dtype=t_dtype, device=y.device).detach()
            sign = 1.0 if bool(dt >= 0) else -1.0
        func = forward if sign > 0 else td_misc._PerturbFunc(td_misc._ReverseFunc(r.f, -1.0))
        ts, dts = sign * t, sign * dt
        if r.dt is not None or sign < 0:
            f0 = func(ts, y)
        y1, error, stiff, k = rk_step(func, tab, td, y, f0, ts, dts, rtol, atol, norm,
                                      diff_weights(tab, y))
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
    plain_norm = options.get("norm", td_misc._rms_norm)

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
