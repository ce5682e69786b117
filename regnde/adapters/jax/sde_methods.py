"""SDE methods of the diffrax backend: step doubling (``diffrax.HalfSolver``) on a
``VirtualBrownianTree``; the method tables and checks, one step-doubling step, the SDE side of
a solve (:func:`sde_parts`) and the Run of an SDE solve (:class:`SdeRun`). The solve itself is
:mod:`.diffrax`'s, shared with ODEs; the terms and Brownian motion are :mod:`.sde_terms`'.

``regnde.solve(sde, y0, t, backend="diffrax", method=...)`` with an SDE object (drift
``f(t, y)``, diffusion ``g(t, y)``, ``noise_type``, ``sde_type``, as torchsde has them; JAX
callables, e.g. an equinox module) runs ``diffrax.diffeqsolve`` on

    MultiTerm(ODETerm(drift), ControlTerm(diffusion, VirtualBrownianTree(t0, t1, tol, shape, key)))

with ``HalfSolver(<method's solver>)`` and a ``PIDController``: every step is compared with two
half steps on the same Brownian path (diffrax's own step doubling), and the controller scales
``|y_half - y_full|`` as it scales any error (``norm(err / (atol + rtol * max(|y0|, |y1|)))``).
The same :class:`regnde.adapters.jax.common.RecordingSolver` as for ODEs wraps the ``HalfSolver``
and records the accepted steps, so ``trace.error`` is exactly the controller's number and
differentiable with ``sensitivity="direct"``; ``trace.stiffness`` is ``None``.

Noise types (:mod:`.sde_terms`; torchsde's conventions; ``y`` of any shape for diagonal noise,
``(..., d)`` else):

- ``"diagonal"``: ``g(t, y)`` has ``y``'s shape; one Brownian channel per state entry
  (``lineax.DiagonalLinearOperator``);
- ``"general"`` / ``"additive"``: ``g(t, y)`` has shape ``(..., d, m)``; Brownian motion
  ``(..., m)``; the product is ``einsum("...dm,...m->...d")`` (each leading index, e.g. each
  batch element, its own noise, as torchsde does);
- ``"scalar"``: as general with ``m = 1``.

Methods (all wrapped in ``HalfSolver``): ``milstein`` (``ItoMilstein`` /
``StratonovichMilstein`` by ``sde_type``; commutative noise: diagonal, scalar, additive),
``heun``, ``midpoint``, ``reversible_heun``, ``euler_heun`` (Stratonovich). Defaults:
``milstein`` for Itô, ``midpoint`` for Stratonovich (torchsde's Stratonovich default). There is
no ``euler``: diffrax refuses Euler's method with adaptive step sizes for SDEs, so Itô SDEs
with general (non-commutative) noise have no method here (write them in Stratonovich form).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp

from regnde.adapters.jax.common import (
    CONTROLLER_OPTIONS,
    JaxKey,
    RecordingSolver,
    _check_f,
    _traced,
    make_key,
    scaled_error,
)
from regnde.adapters.jax.run import DiffraxRun, Evals, Parts
from regnde.adapters.jax.sde_terms import (
    DEFAULT_BM_TOL,
    brownian_shape,
    brownian_tree,
    check_bm,
    make_terms,
)
from regnde.backend import StepRequest
from regnde.trace import StepResult
from regnde.validate import is_concrete

NOISE_TYPES = ("diagonal", "scalar", "additive", "general")
SDE_TYPES = ("ito", "stratonovich")
#: method -> (diffrax solver class by sde_type, drift evaluations per step of that solver).
METHODS: dict[str, tuple[dict[str, type], int]] = {
    "milstein": ({"ito": dfx.ItoMilstein, "stratonovich": dfx.StratonovichMilstein}, 1),
    "heun": ({"stratonovich": dfx.Heun}, 2),
    "midpoint": ({"stratonovich": dfx.Midpoint}, 2),
    "reversible_heun": ({"stratonovich": dfx.ReversibleHeun}, 1),
    "euler_heun": ({"stratonovich": dfx.EulerHeun}, 1),
}
#: Methods that need commutative noise (not checked for general noise: refused there).
COMMUTATIVE_ONLY = ("milstein",)
#: Methods ``BacksolveAdjoint`` accepts: Stratonovich solvers taking a single term.
ADJOINT_METHODS = ("heun", "midpoint", "reversible_heun")
DEFAULT_METHOD = {"ito": "milstein", "stratonovich": "midpoint"}
#: Why there is no ``euler``: diffrax's ``diffeqsolve`` refuses it with adaptive steps.
NO_EULER = ("diffrax refuses Euler's method with adaptive step sizes for SDEs (it may not "
            "converge to the correct solution), HalfSolver(Euler()) included")
#: Options of SDE solves besides the ``PIDController`` fields.
SDE_OPTIONS = ("dt0", "trace_capacity", "bm", "bm_tol")
#: diffrax's initial step for SDEs (``_select_initial_step`` returns it for non-ODE terms).
SDE_INITIAL_DT = 0.01


def is_sde(f: Any) -> bool:
    """An SDE object (drift ``f``, diffusion ``g``, ``noise_type``), not an ODE's ``f``."""
    return hasattr(f, "g") and hasattr(f, "noise_type")


# -- checks ----------------------------------------------------------------------------------------
def working_methods(sde_type: str, noise_type: str, adjoint: bool = False) -> list[str]:
    """The methods that solve SDEs of this type and noise (with ``BacksolveAdjoint``)."""
    return [m for m, (by_type, _) in METHODS.items() if sde_type in by_type
            and not (noise_type == "general" and m in COMMUTATIVE_ONLY)
            and not (adjoint and m not in ADJOINT_METHODS)]


def check_sde(sde: Any) -> None:
    """Checks the SDE object's ``noise_type``, ``sde_type``, ``f`` and ``g``."""
    for attr, valid in (("noise_type", NOISE_TYPES), ("sde_type", SDE_TYPES)):
        value = getattr(sde, attr, None)
        if value not in valid:
            raise ValueError(
                f"the SDE's {attr} is {value!r}; SDEs on backend 'diffrax' need one of "
                f"{', '.join(valid)}. Set sde.{attr}."
            )
    for name in ("f", "g"):
        if not callable(getattr(sde, name, None)):
            raise ValueError(f"the SDE {type(sde).__name__} has no callable {name}(t, y).")


def resolve(method: str, sde: Any, sensitivity: str = "direct") -> str:
    """The method that runs (``""``: the default by ``sde_type``); errors name the working
    ones."""
    sde_type, noise = sde.sde_type, sde.noise_type
    method = method or DEFAULT_METHOD[sde_type]
    if method == "euler":
        ok = working_methods(sde_type, noise)
        raise ValueError(
            f"method 'euler' does not run adaptively on backend 'diffrax': {NO_EULER}. "
            f"Methods that solve {sde_type} SDEs with {noise} noise here: "
            f"{', '.join(ok) or '(none: write the SDE in Stratonovich form)'}."
        )
    if method not in METHODS:
        raise ValueError(f"unknown SDE method {method!r} of backend 'diffrax'; valid: "
                         f"{', '.join(sorted(METHODS))}.")
    ok = working_methods(sde_type, noise)
    if method not in ok:
        raise ValueError(
            f"method {method!r} of backend 'diffrax' does not solve {sde_type} SDEs with "
            f"{noise} noise; methods that do: "
            f"{', '.join(ok) or '(none: write the SDE in Stratonovich form)'}."
        )
    if sensitivity == "adjoint" and method not in ADJOINT_METHODS:
        works = working_methods(sde_type, noise, adjoint=True)
        what = (f"methods that do here: {', '.join(works)}" if works else
                "convert the SDE to Stratonovich form (methods heun, midpoint, "
                "reversible_heun) or use sensitivity='direct'")
        raise ValueError(
            f"sensitivity='adjoint' (diffrax.BacksolveAdjoint) supports Stratonovich SDEs with "
            f"a solver taking one term only; method {method!r} on a {sde_type} SDE does not "
            f"work with it; {what}."
        )
    return method


class ItoRecordingSolver(RecordingSolver, dfx.AbstractItoSolver):
    """:class:`RecordingSolver` marked Itô (diffrax forwards ``isinstance`` one wrapper deep
    only, so the mark of the wrapped method would not reach ``diffeqsolve``'s checks)."""


class StratonovichRecordingSolver(RecordingSolver, dfx.AbstractStratonovichSolver):
    """:class:`RecordingSolver` marked Stratonovich (see :class:`ItoRecordingSolver`)."""


RECORDING = {"ito": ItoRecordingSolver, "stratonovich": StratonovichRecordingSolver}


def make_solver(method: str, sde_type: str) -> dfx.HalfSolver:
    """``HalfSolver`` (step doubling) around diffrax's solver of ``method`` for ``sde_type``."""
    return dfx.HalfSolver(METHODS[method][0][sde_type]())


def drift_evals(method: str) -> Evals:
    """Drift evaluations of ``HalfSolver(method)``: at init, per step attempt (three steps)."""
    per = 3 * METHODS[method][1]
    return Evals(1 if method == "reversible_heun" else 0, per, per)


# -- one step --------------------------------------------------------------------------------------
def double_step(solver: dfx.HalfSolver, terms: Any, t0: Any, t1: Any, y: Any, state: Any
                ) -> tuple[Any, Any, Any, Any]:
    """``HalfSolver.step``'s arithmetic, keeping its parts: ``(y_full, y_mid, y_half, y_error)``
    with ``y_error = |y_half - y_full|`` (what the controller scales)."""
    inner = solver.solver
    th = t0 + 0.5 * (t1 - t0)
    y_mid, _, _, s, _ = inner.step(terms, t0, th, y, None, state, True)
    y_half, _, _, _, _ = inner.step(terms, th, t1, y_mid, None, s, False)
    y_full, _, _, _, _ = inner.step(terms, t0, t1, y, None, state, True)
    return y_full, y_mid, y_half, jnp.abs(y_half - y_full)


def sde_step(solver: dfx.HalfSolver, terms: Any, t0: Any, t1: Any, y: Any,
             controller: dfx.PIDController) -> StepResult:
    """One step-doubling step from ``(t0, y)`` (solver state started afresh); ``stages`` holds
    ``(y_full, y_mid, y_half)``, ``y1`` the two half steps (the state diffrax accepts)."""
    state = solver.init(terms, t0, t1, y, None)
    y_full, y_mid, y_half, y_error = double_step(solver, terms, t0, t1, y, state)
    error = scaled_error(y, y_half, y_error, controller.rtol, controller.atol, controller.norm)
    return StepResult(t=t0, dt=t1 - t0, y1=y_half, error=error, stiffness=None,
                      stages=jnp.stack([y_full, y_mid, y_half]))


# -- the Run regularizers see ----------------------------------------------------------------------
class SdeRun(DiffraxRun):
    """The Run of an SDE solve: the same terms (Brownian path included), solver and controller
    as the solve. ``tableau`` is ``None``."""

    def __init__(self, *, dt0: Any, **common: Any):
        super().__init__(**common)
        self.dt0 = dt0

    def step(self, tau: Any, y: Any, dt: Any, first_stage: str = "differentiable") -> StepResult:
        """One step-doubling step from ``(tau, y)`` on the solve's Brownian path, ending at
        ``min(tau + |dt|, t1)`` (where the Brownian path ends)."""
        if first_stage != "differentiable":
            raise ValueError(
                f"first_stage={first_stage!r} treats an RK method's first stage as a constant; "
                f"diffrax's step doubling for SDEs has no such stage. Use "
                f"first_stage='differentiable' (the default) for SDEs."
            )
        tau = jax.lax.stop_gradient(tau)
        dt = jax.lax.stop_gradient(jnp.abs(jnp.asarray(dt, dtype=jnp.result_type(tau))))
        end = jnp.minimum(tau + dt, self.t1)
        self.nfe = self.nfe + self.evals.count(1)
        return sde_step(self.solver, self.terms, tau, end, y, self.controller)

    def initial_dt(self, tau: Any, y: Any) -> jax.Array:
        """diffrax has no initial step selection for SDEs: ``dt0`` if given, else the 0.01 its
        ``PIDController`` starts SDE solves with; clipped to ``t1 - tau``."""
        h = SDE_INITIAL_DT if self.dt0 is None else self.dt0
        tau = jax.lax.stop_gradient(tau)
        return jnp.minimum(jnp.asarray(h, dtype=jnp.result_type(tau)), self.t1 - tau)


# -- the SDE side of a solve -----------------------------------------------------------------------
@dataclass(frozen=True)
class SdeKind:
    """The static part of an SDE solve besides the method (hashable, like the solve's)."""

    sde_type: str
    noise_type: str
    bm_tol: Any
    bm_shape: tuple[int, ...]


def sde_method(method: str, sde: Any, t: jax.Array, traced: bool, sensitivity: str) -> str:
    """The method of an SDE solve over ``t`` (checked: forward in time, see :func:`resolve`)."""
    if not traced and not bool(t[-1] > t[0]):
        raise ValueError("SDEs on backend 'diffrax' solve forward in time only: pass "
                         "increasing t.")
    return resolve(method, sde, sensitivity)


def sde_kind(sde: Any, t0: Any, y0: jax.Array, other: Mapping[str, Any]) -> SdeKind:
    """:class:`SdeKind` of a solve with options ``other``; checks the diffusion and ``bm``."""
    shape = brownian_shape(sde, t0, y0)
    check_bm(other.get("bm"), shape)
    return SdeKind(sde.sde_type, sde.noise_type, other.get("bm_tol"), shape)


def sde_parts(sde: Any, y0: jax.Array, t: jax.Array, key: JaxKey, bm: Any, st: Any,
              controller: dfx.PIDController) -> Parts:
    """The SDE side of the solve in :mod:`.diffrax` (``st``: its static part, ``st.sde`` an
    :class:`SdeKind`): the Brownian tree unless ``bm`` is given, ``HalfSolver(method)``."""
    kind: SdeKind = st.sde
    t0, t1 = t[0], t[-1]
    if bm is None:
        tol = kind.bm_tol if kind.bm_tol is not None else DEFAULT_BM_TOL * (t1 - t0)
        bm = brownian_tree(key, t0, t1, tol, kind.bm_shape, y0.dtype)
    solver = make_solver(st.method, kind.sde_type)
    drift, diffusion = sde.f, sde.g
    if st.sensitivity == "adjoint":  # explicit parameters for BacksolveAdjoint
        drift = eqx.filter_closure_convert(sde.f, t0, y0)
        diffusion = eqx.filter_closure_convert(sde.g, t0, y0)
    # The Run's local steps run on the unconverted SDE and the same Brownian path.
    plain = make_terms(sde.f, sde.g, kind.noise_type, bm)
    evals = drift_evals(st.method)
    make_run = functools.partial(SdeRun, t0=t0, t1=t1, y0=y0, sensitivity=st.sensitivity,
                                 terms=plain, solver=solver, controller=controller, evals=evals,
                                 dt0=st.dt0)
    return Parts(solver=solver, recording=RECORDING[kind.sde_type], tab=None,
                 terms=make_terms(drift, diffusion, kind.noise_type, bm), plain_terms=plain,
                 state0=y0, dt0=st.dt0, selection=0, evals=evals,
                 direction=jnp.ones((), t.dtype), aug=None, make_run=make_run)


def step_sde(r: StepRequest, t0: jax.Array) -> StepResult:
    """``regnde.step`` for an SDE from ``t0``: one ``HalfSolver`` step (full step and two halves
    on one Brownian path). Options: ``bm`` (a Brownian path covering the step), else a
    ``VirtualBrownianTree`` over ``[t, t + dt]`` seeded by ``key`` (int seed or PRNG key;
    required under jit) with tolerance ``bm_tol``; ``PIDController`` fields. ``dt=None`` takes
    the 0.01 diffrax's controller starts SDE solves with."""
    sde, y = r.f, r.y
    method = resolve(r.method, sde)
    options = dict(r.options)
    key_arg = options.pop("key", None)
    bm = options.pop("bm", None)
    bm_tol = options.pop("bm_tol", None)
    unknown = sorted(set(options) - set(CONTROLLER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} of regnde.step for SDEs on diffrax; "
                         f"allowed: key, bm, bm_tol, {', '.join(CONTROLLER_OPTIONS)}.")
    dt = SDE_INITIAL_DT if r.dt is None else r.dt
    dt = jax.lax.stop_gradient(jnp.asarray(dt, dtype=y.dtype))
    if is_concrete(dt) and not bool(dt > 0):
        raise ValueError(f"SDEs on diffrax step forward in time only: dt must be > 0, got "
                         f"{float(dt)}.")
    _check_f(sde.f, t0, y)
    shape = brownian_shape(sde, t0, y)
    check_bm(bm, shape)
    t1 = t0 + dt
    if bm is None:
        key = make_key(key_arg, _traced(y, t0, key_arg, sde))
        tol = bm_tol if bm_tol is not None else DEFAULT_BM_TOL * dt
        bm = brownian_tree(key, t0, t1, tol, shape, y.dtype)
    controller = dfx.PIDController(rtol=r.rtol, atol=r.atol, **options)
    terms = make_terms(sde.f, sde.g, sde.noise_type, bm)
    return sde_step(make_solver(method, sde.sde_type), terms, t0, t1, y, controller)
