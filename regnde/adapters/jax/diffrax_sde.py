"""SDEs on the diffrax backend: step doubling (``diffrax.HalfSolver``) on a ``VirtualBrownianTree``.

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

Noise types (torchsde's conventions; ``y`` of any shape for diagonal noise, ``(..., d)`` else):

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from regnde.adapters.jax.common import (
    CONTROLLER_OPTIONS,
    CapturedStates,
    JaxKey,
    RecordingSolver,
    _attach_errors,
    _check_f,
    _check_result_eager,
    _check_y,
    _stop,
    _traced,
    _VectorField,
    make_key,
    scaled_error,
)
from regnde.backend import SolveRequest, StepRequest
from regnde.engine import Plan, check_value, regularize, solution
from regnde.errors import non_finite_regularizer
from regnde.regularizers import containing_step
from regnde.samplers import take
from regnde.trace import Solution, Stats, StepResult, Trace
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
#: ``VirtualBrownianTree`` tolerance relative to ``|t1 - t0|`` when ``bm_tol`` is not given.
DEFAULT_BM_TOL = 1e-5
#: The key stream that seeds the Brownian motion (as on torchsde): ``fold_in(key, 0x5DE)``.
BROWNIAN_STREAM = 0x5DE
#: diffrax's initial step for SDEs (``_select_initial_step`` returns it for non-ODE terms).
SDE_INITIAL_DT = 0.01


def is_sde(f: Any) -> bool:
    return hasattr(f, "g") and hasattr(f, "noise_type")


# -- terms -----------------------------------------------------------------------------------------
class NoiseMatrix(lx.AbstractLinearOperator):
    """``g`` of shape ``(..., d, m)`` acting on Brownian increments ``(..., m)``."""

    matrix: jax.Array

    def mv(self, vector: Any) -> Any:
        return jnp.einsum("...dm,...m->...d", self.matrix, vector)

    def as_matrix(self) -> Any:
        raise NotImplementedError("regnde's NoiseMatrix has no dense matrix form.")

    def transpose(self) -> Any:
        raise NotImplementedError("regnde's NoiseMatrix has no transpose.")

    def in_structure(self) -> Any:
        s = self.matrix.shape
        return jax.ShapeDtypeStruct((*s[:-2], s[-1]), self.matrix.dtype)

    def out_structure(self) -> Any:
        return jax.ShapeDtypeStruct(self.matrix.shape[:-1], self.matrix.dtype)


for _prop in (lx.is_symmetric, lx.is_positive_semidefinite, lx.is_negative_semidefinite):
    _prop.register(NoiseMatrix)(lambda operator: False)  # lineax's __check_init__ asks


class _Diffusion(eqx.Module):
    g: Callable[..., Any]
    diagonal: bool = eqx.field(static=True)

    def __call__(self, t: Any, y: Any, args: Any) -> Any:
        g = self.g(t, y)
        return lx.DiagonalLinearOperator(g) if self.diagonal else NoiseMatrix(g)


def make_terms(drift: Callable[..., Any], diffusion: Callable[..., Any], noise_type: str,
               bm: Any) -> dfx.MultiTerm:
    """``MultiTerm(ODETerm(drift), ControlTerm(diffusion, bm))`` for regnde's ``f(t, y)``,
    ``g(t, y)``."""
    return dfx.MultiTerm(dfx.ODETerm(_VectorField(drift)),
                         dfx.ControlTerm(_Diffusion(diffusion, noise_type == "diagonal"), bm))


def brownian_shape(sde: Any, t0: Any, y0: jax.Array) -> tuple[int, ...]:
    """The Brownian motion's shape; checks the diffusion's shape (no evaluation)."""
    noise = sde.noise_type
    try:
        g = jax.eval_shape(sde.g, t0, y0)
    except Exception as exc:
        raise ValueError(
            f"calling the diffusion g(t, y) with y of shape {tuple(y0.shape)} failed: "
            f"{type(exc).__name__}: {exc}. g must take (t, y)."
        ) from exc
    shape = tuple(getattr(g, "shape", ()))
    if getattr(g, "dtype", None) != y0.dtype:
        raise ValueError(f"the diffusion g(t, y) must return an array of y0's dtype {y0.dtype}, "
                         f"got {getattr(g, 'dtype', type(g))}.")
    y = tuple(y0.shape)
    if noise == "diagonal":
        if shape != y:
            raise ValueError(
                f"the diffusion g(t, y) of an SDE with diagonal noise must have the shape of y, "
                f"{y}; got {shape}. Return one entry per state, or set noise_type='general' "
                f"for a (..., d, m) diffusion matrix."
            )
        return y
    m_hint = "1" if noise == "scalar" else "m"
    if (len(y) < 1 or len(shape) != len(y) + 1 or shape[:-1] != y
            or (noise == "scalar" and shape[-1] != 1)):
        raise ValueError(
            f"the diffusion g(t, y) of an SDE with {noise} noise must have shape "
            f"(..., d, {m_hint}) = {(*y, m_hint)}; got {shape}. For one noise channel per state "
            f"use noise_type='diagonal' and g of y's shape."
        )
    return (*y[:-1], shape[-1])


def brownian_tree(key: JaxKey, t0: Any, t1: Any, tol: Any, shape: tuple[int, ...],
                  dtype: Any) -> dfx.VirtualBrownianTree:
    """The Brownian motion for ``key``: a ``VirtualBrownianTree`` over ``[t0, t1]`` whose key
    is ``jax.random.fold_in(key, BROWNIAN_STREAM)``."""
    k = jax.random.fold_in(key._key(), BROWNIAN_STREAM)
    return dfx.VirtualBrownianTree(t0, t1, tol, jax.ShapeDtypeStruct(shape, dtype), k)


# -- checks ----------------------------------------------------------------------------------------
def working_methods(sde_type: str, noise_type: str, adjoint: bool = False) -> list[str]:
    return [m for m, (by_type, _) in METHODS.items() if sde_type in by_type
            and not (noise_type == "general" and m in COMMUTATIVE_ONLY)
            and not (adjoint and m not in ADJOINT_METHODS)]


def check_sde(sde: Any) -> None:
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
    return dfx.HalfSolver(METHODS[method][0][sde_type]())


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = sorted(set(options) - set(CONTROLLER_OPTIONS) - set(SDE_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown diffrax SDE option(s) {unknown}; allowed: "
            f"{', '.join((*CONTROLLER_OPTIONS, *SDE_OPTIONS))}."
        )
    ctrl = {k: v for k, v in options.items() if k in CONTROLLER_OPTIONS}
    return ctrl, {k: v for k, v in options.items() if k in SDE_OPTIONS}


def _check_bm(bm: Any, shape: tuple[int, ...]) -> None:
    if bm is None:
        return
    if not isinstance(bm, dfx.AbstractBrownianPath):
        raise ValueError(f"bm must be a diffrax Brownian path (VirtualBrownianTree), got "
                         f"{type(bm).__name__}.")
    got = tuple(getattr(getattr(bm, "shape", None), "shape", ()))
    if got != shape:
        raise ValueError(f"bm has shape {got}, the diffusion needs Brownian motion of shape "
                         f"{shape}.")


def _drift_evals(method: str) -> tuple[int, int]:
    """Drift evaluations ``(at init, per HalfSolver step attempt)``."""
    return (1 if method == "reversible_heun" else 0), 3 * METHODS[method][1]


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
class SdeRun(CapturedStates):
    """The :class:`regnde.backend.Run` of a diffrax SDE solve: the same terms (Brownian path
    included), solver and controller as the solve. ``tableau`` is ``None``."""

    tableau = None

    def __init__(self, *, trace: Trace, t0: Any, t1: Any, sensitivity: str, terms: Any,
                 solver: dfx.HalfSolver, controller: dfx.PIDController, method: str,
                 captured: dict[int, Any], y0: Any, dt0: Any):
        self.trace, self.t0, self.t1, self.y0 = trace, t0, t1, y0
        self.sensitivity, self.terms, self.solver = sensitivity, terms, solver
        self.controller, self.method, self.captured, self.dt0 = controller, method, captured, dt0
        self.nfe: Any = 0

    def _replay(self, j: Any) -> jax.Array:
        """The state at the start of accepted step ``j``: the recorded steps replayed from
        ``y0`` with the ``HalfSolver`` (forward only, a constant; ``j`` steps)."""
        tr, solver, terms = self.trace, self.solver, _stop(self.terms)
        ts, dts = jax.lax.stop_gradient(tr.t), jax.lax.stop_gradient(tr.dt)
        y0 = jax.lax.stop_gradient(self.y0)

        def body(carry: Any) -> Any:
            i, y, state = carry
            y1, _, _, state, _ = solver.step(terms, ts[i], ts[i] + dts[i], y, None, state, False)
            return i + 1, y1, state

        state = solver.init(terms, ts[0], ts[0] + dts[0], y0, None)
        _, y, _ = jax.lax.while_loop(lambda c: c[0] < j, body,
                                     (jnp.asarray(0, j.dtype), y0, state))
        init, per = _drift_evals(self.method)
        self.nfe = self.nfe + jnp.where(j > 0, init + j * per, 0)
        return y

    def _from_trace(self, tau: Any, differentiable: bool) -> jax.Array:
        tr = self.trace
        j = containing_step(self, tau)
        tj, dtj = take(tr.t, j), jax.lax.stop_gradient(take(tr.dt, j))
        if tr.y is not None:
            yj = jnp.take(tr.y, j, axis=0)
        elif differentiable:
            raise ValueError(
                "state='differentiable' at a time drawn after the solve (this sampler) needs "
                "the states of the solve: pass trace='full', or use state='constant'."
            )
        else:
            yj = self._replay(j)
        solver, terms = self.solver, self.terms

        def interpolate() -> Any:  # the solver's dense output of the step (fresh state)
            state = solver.init(terms, tj, tj + dtj, yj, None)
            _, _, dense, _, _ = solver.step(terms, tj, tj + dtj, yj, None, state, True)
            return solver.interpolation_cls(t0=tj, t1=tj + dtj, **dense).evaluate(tau)

        init, per = _drift_evals(self.method)
        at_start = tau == tj
        self.nfe = self.nfe + jnp.where(at_start, 0, init + per)
        return jax.lax.cond(at_start, lambda: yj, interpolate)

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
        init, per = _drift_evals(self.method)
        self.nfe = self.nfe + init + per
        return sde_step(self.solver, self.terms, tau, end, y, self.controller)

    def initial_dt(self, tau: Any, y: Any) -> jax.Array:
        """diffrax has no initial step selection for SDEs: ``dt0`` if given, else the 0.01 its
        ``PIDController`` starts SDE solves with; clipped to ``t1 - tau``."""
        h = SDE_INITIAL_DT if self.dt0 is None else self.dt0
        tau = jax.lax.stop_gradient(tau)
        return jnp.minimum(jnp.asarray(h, dtype=jnp.result_type(tau)), self.t1 - tau)


# -- solve -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SdeStatic:
    method: str
    sde_type: str
    noise_type: str
    rtol: float
    atol: float
    sensitivity: str
    regularizer: Any
    max_steps: int
    trace: str
    capacity: int
    controller: tuple[tuple[str, Any], ...]
    dt0: Any
    bm_tol: Any
    bm_shape: tuple[int, ...]
    traced: bool


def solve_sde(r: SolveRequest) -> Solution:
    """``regnde.solve`` for an SDE object on the diffrax backend."""
    sde = r.f
    check_sde(sde)
    _check_y(r.y0, "y0")
    t = jnp.asarray(r.t)
    traced = _traced(r.y0, t, r.key, sde)
    if not traced and not bool(t[-1] > t[0]):
        raise ValueError("SDEs on backend 'diffrax' solve forward in time only: pass "
                         "increasing t.")
    method = resolve(r.method, sde, r.sensitivity)
    ctrl_opts, other = split_options(r.options)
    capacity = other.get("trace_capacity", r.max_steps)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not (
            1 <= capacity <= r.max_steps):
        raise ValueError(f"trace_capacity must be an int in [1, max_steps={r.max_steps}], got "
                         f"{capacity!r}.")
    _check_f(sde.f, t[0], r.y0)
    shape = brownian_shape(sde, t[0], r.y0)
    bm = other.get("bm")
    _check_bm(bm, shape)
    key = make_key(r.key, traced)
    if not traced and (bm is None or r.regularizer is not None):
        key._key()  # eager key=None: draw now (the Brownian path needs it)
    static = _SdeStatic(method=method, sde_type=sde.sde_type, noise_type=sde.noise_type,
                        rtol=r.rtol, atol=r.atol, sensitivity=r.sensitivity,
                        regularizer=r.regularizer, max_steps=r.max_steps, trace=r.trace,
                        capacity=capacity, controller=tuple(sorted(ctrl_opts.items())),
                        dt0=other.get("dt0"), bm_tol=other.get("bm_tol"), bm_shape=shape,
                        traced=traced)
    out = _solve_sde_jit(sde, r.y0, t, key.key, bm, static)
    if not traced:
        _check_result_eager(out, static)
    trace = Trace(**out["trace"])
    check_value(out["reg"], r.regularizer, trace, traced)
    return solution(out["ys"], trace, Stats(**out["stats"]), out["reg"])


def _solve_sde(sde: Any, y0: jax.Array, t: jax.Array, key: Any, bm: Any, st: _SdeStatic
               ) -> dict[str, Any]:
    jkey = JaxKey(key, st.traced)
    t0, t1 = t[0], t[-1]
    if bm is None:
        tol = st.bm_tol if st.bm_tol is not None else DEFAULT_BM_TOL * (t1 - t0)
        bm = brownian_tree(jkey, t0, t1, tol, st.bm_shape, y0.dtype)
    solver = make_solver(st.method, st.sde_type)
    controller = dfx.PIDController(rtol=st.rtol, atol=st.atol, **dict(st.controller))
    adjoint = st.sensitivity == "adjoint"
    drift, diffusion = sde.f, sde.g
    if adjoint:  # explicit parameters for BacksolveAdjoint (closures over traced values)
        drift = eqx.filter_closure_convert(sde.f, t0, y0)
        diffusion = eqx.filter_closure_convert(sde.g, t0, y0)
    terms = make_terms(drift, diffusion, st.noise_type, bm)
    reg = st.regularizer

    plan = Plan(reg, jkey, t0, t1, st.trace, replays=True)  # SdeRun replays step starts
    keep_states = plan.keep_states
    probe_ts = None
    if plan.probes:
        probe_ts = jax.lax.stop_gradient(jnp.stack(plan.probe_times()).astype(t.dtype))
    rec = RECORDING[st.sde_type](solver, None, st.capacity, st.rtol, st.atol, controller.norm,
                                 probe_ts)
    common = dict(stepsize_controller=controller, max_steps=st.max_steps, throw=False)

    def run(terms: Any, y0: Any, states: bool, adj: Any) -> Any:
        if states:
            saveat = dfx.SaveAt(subs=[dfx.SubSaveAt(ts=t), dfx.SubSaveAt(steps=True)],
                                solver_state=True)
        else:
            saveat = dfx.SaveAt(ts=t, solver_state=True)
        return dfx.diffeqsolve(terms, rec, t0, t1, st.dt0, y0, saveat=saveat, adjoint=adj,
                               **common)

    if adjoint:
        sol = run(terms, y0, False, dfx.BacksolveAdjoint(solver=solver, throw=True))
        ys = sol.ys
        record = jax.lax.stop_gradient(sol.solver_state[1])
        steps_ys = None
        if keep_states:
            side = run(_stop(terms), jax.lax.stop_gradient(y0), True,
                       dfx.RecursiveCheckpointAdjoint())
            steps_ys = jax.lax.stop_gradient(side.ys[1])
    else:
        sol = run(terms, y0, keep_states, dfx.RecursiveCheckpointAdjoint())
        ys, steps_ys = (sol.ys[0], sol.ys[1]) if keep_states else (sol.ys, None)
        record = sol.solver_state[1]
    if st.traced:
        ys = _attach_errors(ys, sol.result, record, st.max_steps, st.capacity)

    capacity = st.capacity
    mask = jnp.arange(capacity) < jnp.minimum(record["n"], capacity)
    y_trace = None
    if steps_ys is not None:
        starts = jnp.concatenate([y0[None], steps_ys[: capacity - 1]], axis=0)
        bmask = mask.reshape((-1,) + (1,) * y0.ndim)
        y_trace = jnp.where(bmask, starts, jnp.zeros_like(starts))
    trace = dict(t=record["t"], dt=jax.lax.stop_gradient(record["dt"]), mask=mask,
                 n_steps=record["n"], error=record["error"], stiffness=None, y=y_trace)
    init, per = _drift_evals(st.method)
    stats = dict(nfe=init + per * sol.stats["num_steps"], nfe_reg=0,
                 n_steps=sol.stats["num_accepted_steps"],
                 n_rejected=sol.stats["num_rejected_steps"])
    value = None
    if reg is not None:
        captured = plan.captured(record["probes"]) if plan.probes else {}
        # The local step runs on the unconverted SDE and the same Brownian path.
        run_terms = make_terms(sde.f, sde.g, st.noise_type, bm)
        srun = SdeRun(trace=Trace(**trace), t0=t0, t1=t1, sensitivity=st.sensitivity,
                      terms=run_terms, solver=solver, controller=controller, method=st.method,
                      captured=captured, y0=y0, dt0=st.dt0)
        value, stats["nfe_reg"] = regularize(plan, srun)
        if st.traced:
            value = eqx.error_if(value, ~jnp.isfinite(value), non_finite_regularizer(
                repr(reg), "the step is not known under jit"))
    failure = dict(result=sol.result, n=record["n"], t=record["t"], dt=record["dt"],
                   direction=jnp.ones((), t.dtype), t1=t1)
    return dict(ys=ys, trace=trace, stats=stats, reg=value, failure=failure)


_solve_sde_jit = eqx.filter_jit(_solve_sde)


def step_sde(r: StepRequest) -> StepResult:
    """``regnde.step`` for an SDE: one ``HalfSolver`` step (full step and two halves on one
    Brownian path). Options: ``bm`` (a Brownian path covering the step), else a
    ``VirtualBrownianTree`` over ``[t, t + dt]`` seeded by ``key`` (int seed or PRNG key;
    required under jit) with tolerance ``bm_tol``; ``PIDController`` fields. ``dt=None`` takes
    the 0.01 diffrax's controller starts SDE solves with."""
    sde, y = r.f, r.y
    check_sde(sde)
    _check_y(y, "y")
    method = resolve(r.method, sde)
    options = dict(r.options)
    key_arg = options.pop("key", None)
    bm = options.pop("bm", None)
    bm_tol = options.pop("bm_tol", None)
    unknown = sorted(set(options) - set(CONTROLLER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} of regnde.step for SDEs on diffrax; "
                         f"allowed: key, bm, bm_tol, {', '.join(CONTROLLER_OPTIONS)}.")
    t0 = jax.lax.stop_gradient(jnp.asarray(r.t, dtype=y.dtype))
    dt = SDE_INITIAL_DT if r.dt is None else r.dt
    dt = jax.lax.stop_gradient(jnp.asarray(dt, dtype=y.dtype))
    if is_concrete(dt) and not bool(dt > 0):
        raise ValueError(f"SDEs on diffrax step forward in time only: dt must be > 0, got "
                         f"{float(dt)}.")
    _check_f(sde.f, t0, y)
    shape = brownian_shape(sde, t0, y)
    _check_bm(bm, shape)
    t1 = t0 + dt
    if bm is None:
        key = make_key(key_arg, _traced(y, t0, key_arg, sde))
        tol = bm_tol if bm_tol is not None else DEFAULT_BM_TOL * dt
        bm = brownian_tree(key, t0, t1, tol, shape, y.dtype)
    controller = dfx.PIDController(rtol=r.rtol, atol=r.atol, **options)
    terms = make_terms(sde.f, sde.g, sde.noise_type, bm)
    return sde_step(make_solver(method, sde.sde_type), terms, t0, t1, y, controller)
