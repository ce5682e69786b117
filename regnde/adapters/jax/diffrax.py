"""The diffrax backend, a regnde plugin.

How it records: ``diffrax.diffeqsolve`` runs a :class:`RecordingSolver` that wraps diffrax's own
solver (``Dopri5``, ``Tsit5``, ...) transparently — same ``step``, same ``y_error``, same dense
output — and writes each step's start time, length, scaled error and stiffness estimate into
fixed-capacity arrays in its solver state. diffrax keeps a step's new solver state only when the
controller accepts the step (``_integrate.py``, the ``keep_step`` select), so rejected steps
never reach the record. The final record comes back through ``SaveAt(solver_state=True)``;
states at step starts (``trace.y``) through diffrax's own ``SaveAt(steps=True)`` buffer. No
Python callback runs in the solver loop: everything works under ``jax.jit``, ``jax.grad``,
``eqx.filter_jit`` / ``eqx.filter_grad`` and ``jax.vmap``.

Sensitivities: ``"direct"`` is ``RecursiveCheckpointAdjoint`` (the record is differentiable);
``"adjoint"`` is ``BacksolveAdjoint`` whose backward solve runs the unwrapped solver. Under
``BacksolveAdjoint`` the record still comes back (as constants); only states at step starts
need a second, forward-only solve (``trace="full"`` or a sampler that needs them, such as
``"biased"``). See ``docs/diffrax.md`` for the combinations and their cost.

Methods: diffrax's own ``Dopri5``, ``Dopri8``, ``Tsit5``, ``Bosh3``, ``Heun``, ``Midpoint``,
``Ralston`` with their own dense output; a registered :class:`regnde.Tableau` that diffrax lacks
runs a generic ``diffrax.AbstractERK`` built from it, with cubic Hermite dense output (a tableau
that is not FSAL evaluates ``f(t1, y1)`` for it: one evaluation more per step).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx

from regnde.adapters import builtin
from regnde.adapters.jax.common import (
    _NONFINITE,
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
    stiffness,
)
from regnde.backend import Backend, SolveRequest, StepRequest
from regnde.engine import Plan, check_value, regularize, solution
from regnde.errors import (
    non_finite_regularizer,
)
from regnde.plugins.hookspecs import hookimpl
from regnde.regularizers import containing_step
from regnde.samplers import take
from regnde.tableau import Tableau, equal_c_pair
from regnde.trace import Solution, Stats, StepResult, Trace

#: canonical regnde name -> diffrax's own adaptive explicit RK solver class.
NATIVE: dict[str, type] = {
    "dopri5": dfx.Dopri5, "dopri8": dfx.Dopri8, "tsit5": dfx.Tsit5, "bosh3": dfx.Bosh3,
    "heun": dfx.Heun, "midpoint": dfx.Midpoint, "ralston": dfx.Ralston,
}
ALIASES = {"adaptive_heun": "heun"}
#: other options: ``dt0`` (first step, passed to ``diffeqsolve``), ``trace_capacity``.
OTHER_OPTIONS = ("dt0", "trace_capacity")


# -- tableaus -----------------------------------------------------------------------------------
@functools.cache
def native_tableau(name: str) -> Tableau:
    """A :class:`Tableau` holding the coefficients diffrax's own ``name`` solver runs."""
    cls: Any = NATIVE[name]
    tab = cls.tableau
    c = (0.0, *(float(x) for x in tab.c))
    a = ((), *(tuple(float(x) for x in row) for row in tab.a_lower))
    return Tableau(name, order=int(cls().order(None)), c=c, a=a,
                   b=tuple(float(x) for x in tab.b_sol),
                   b_error=tuple(float(x) for x in tab.b_error), stiffness_pair=equal_c_pair(c))


def to_diffrax(tab: Tableau) -> dfx.ButcherTableau:
    """diffrax's ``ButcherTableau`` of a regnde tableau (``c`` without the first stage)."""
    return dfx.ButcherTableau(
        c=np.asarray(tab.c[1:], dtype=np.float64),
        b_sol=np.asarray(tab.b, dtype=np.float64),
        b_error=np.asarray(tab.b_error, dtype=np.float64),
        a_lower=tuple(np.asarray(row, dtype=np.float64) for row in tab.a[1:]),
    )


class _TableauERK(dfx.AbstractERK):
    """Base of the generic solvers built from registered tableaus (one subclass each)."""

    regnde_tableau: ClassVar[Tableau]
    interpolation_cls: ClassVar[Callable[..., Any]] = (
        dfx.ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms: Any) -> int:
        return self.regnde_tableau.order

    def step(self, terms: Any, t0: Any, t1: Any, y0: Any, args: Any, solver_state: Any,
             made_jump: Any) -> Any:
        y1, y_error, dense, state, result = super().step(terms, t0, t1, y0, args, solver_state,
                                                         made_jump)
        if not self.tableau.fsal:  # type: ignore[union-attr]
            # Hermite needs f(t1, y1): append it (times dt, like diffrax's k) as a last row.
            k1 = terms.vf_prod(t1, y1, args, terms.contr(t0, t1))
            k = jtu.tree_map(lambda k, x: jnp.concatenate([k, x[None]]), dense["k"], k1)
            dense = dict(dense, k=k)
        return y1, y_error, dense, state, result


_GENERIC: dict[Tableau, type] = {}


def tableau_solver(tab: Tableau) -> type:
    """A diffrax ``AbstractERK`` subclass running ``tab`` (cached per tableau)."""
    if tab not in _GENERIC:
        _GENERIC[tab] = type(f"RegndeERK_{tab.name}", (_TableauERK,), {
            "__annotations__": {"tableau": ClassVar[dfx.ButcherTableau],
                                "regnde_tableau": ClassVar[Tableau]},
            "tableau": to_diffrax(tab), "regnde_tableau": tab,
        })
    return _GENERIC[tab]


def make_solver(method: str, tableau: Tableau | None) -> dfx.AbstractRungeKutta:
    """diffrax's own solver for ``method`` if it has one, else the generic tableau solver."""
    if method in NATIVE:
        return NATIVE[method]()
    if tableau is None:
        raise ValueError(f"method {method!r} has no tableau to run on diffrax.")
    return tableau_solver(tableau)()


def solver_tableau(method: str, tableau: Tableau | None) -> Tableau:
    if method in NATIVE:
        return native_tableau(method)
    assert tableau is not None
    return tableau


def evals_per_step(solver: Any, tab: Tableau) -> tuple[int, int]:
    """Vector-field evaluations of ``(the first step, every later step attempt)``."""
    s = tab.stages
    if solver.tableau.fsal:
        return s, s - 1
    extra = 1 if isinstance(solver, _TableauERK) else 0
    return s + extra, s + extra


def rk_step(f: Callable[[Any, Any], Any], tab: Tableau, t: Any, y: jax.Array, dt: Any,
            f0: Any, rtol: Any, atol: Any, norm: Callable[[Any], Any] = optx.rms_norm
            ) -> StepResult:
    """One step of ``tab`` from ``(t, y)`` with ``f0 = f(t, y)`` given (it may be a constant).

    Differentiable w.r.t. ``y`` and whatever ``f`` closes over; ``t`` and ``dt`` are used as
    given (pass constants). ``stages`` has shape ``(stages, *y.shape)`` (values of ``f``)."""
    fs = [f0]
    for i in range(1, tab.stages):
        incr = sum((a * fj for a, fj in zip(tab.a[i], fs, strict=True) if a != 0.0),
                   jnp.zeros_like(y))
        fs.append(f(t + tab.c[i] * dt, y + dt * incr))
    y1 = y + dt * sum((b * fj for b, fj in zip(tab.b, fs, strict=True) if b != 0.0),
                      jnp.zeros_like(y))
    err = dt * sum((b * fj for b, fj in zip(tab.b_error, fs, strict=True) if b != 0.0),
                   jnp.zeros_like(y))
    k = jnp.stack(fs)
    return StepResult(t=t, dt=dt, y1=y1, error=scaled_error(y, y1, err, rtol, atol, norm),
                      stiffness=stiffness(k, dt, tab), stages=k)


class _Negated(eqx.Module):
    """``f`` in solver time ``s = direction * t``: ``direction * f(direction * s, y)``."""

    f: Callable[..., Any]
    direction: Any

    def __call__(self, s: Any, y: Any, args: Any = None) -> Any:
        return self.direction * self.f(self.direction * s, y)


class JaxRun(CapturedStates):
    """The :class:`regnde.backend.Run` of a diffrax solve (user's time direction)."""

    def __init__(self, *, trace: Trace, t0: Any, t1: Any, sensitivity: str, tableau: Tableau,
                 f: Callable[[Any, Any], Any], solver: Any, controller: dfx.PIDController,
                 captured: dict[int, Any], y0: Any, integrals: dict[int, Any] | None = None):
        self.trace, self.t0, self.t1, self.y0 = trace, t0, t1, y0
        self.integrals = integrals or {}
        self.sensitivity, self.tableau = sensitivity, tableau
        self.f, self.solver, self.controller = f, solver, controller
        self.captured = captured
        self.direction = jnp.where(t1 >= t0, 1, -1).astype(jnp.result_type(t0))
        self.nfe: Any = 0

    def _replay(self, term: Any, j: Any) -> jax.Array:
        """The state at the start of accepted step ``j``: the recorded steps replayed from
        ``y0`` with the solver's own ``step`` (forward only, a constant; ``j`` steps)."""
        tr, solver = self.trace, self.solver
        ts, dts = jax.lax.stop_gradient(tr.t), jax.lax.stop_gradient(tr.dt)
        y0 = jax.lax.stop_gradient(self.y0)

        def body(carry: Any) -> Any:
            i, y, state = carry
            t0, t1 = ts[i], ts[i] + dts[i]
            y1, _, _, state, _ = solver.step(term, t0, t1, y, None, state, False)
            return i + 1, y1, state

        state = solver.init(term, ts[0], ts[0] + dts[0], y0, None)
        _, y, _ = jax.lax.while_loop(lambda c: c[0] < j, body, (jnp.asarray(0, j.dtype), y0,
                                                                state))
        first, later = evals_per_step(solver, self.tableau)
        self.nfe = self.nfe + jnp.where(j > 0, first + (j - 1) * later, 0)
        return y

    def integral(self, reg: Any) -> jax.Array:
        """``r(t1)`` of the augmented solve for the integral regularizer ``reg``."""
        value = self.integrals.get(id(reg))
        if value is None:
            raise ValueError(f"{reg!r} was not integrated along this solve.")
        return value

    def _from_trace(self, tau: Any, differentiable: bool) -> jax.Array:
        tr = self.trace
        j = containing_step(self, tau)
        tj, dtj = take(tr.t, j), jax.lax.stop_gradient(take(tr.dt, j))
        term = dfx.ODETerm(_VectorField(self.f))
        if tr.y is not None:
            yj = jnp.take(tr.y, j, axis=0)
        elif differentiable:
            raise ValueError(
                "state='differentiable' at a time drawn after the solve (this sampler) needs "
                "the states of the solve: pass trace='full', or use state='constant'."
            )
        else:
            yj = self._replay(term, j)

        def interpolate() -> Any:
            state = self.solver.init(term, tj, tj + dtj, yj, None)
            _, _, dense, _, _ = self.solver.step(term, tj, tj + dtj, yj, None, state, True)
            return self.solver.interpolation_cls(t0=tj, t1=tj + dtj, **dense).evaluate(tau)

        at_start = tau == tj
        first, _ = evals_per_step(self.solver, self.tableau)
        self.nfe = self.nfe + jnp.where(at_start, 0, first)
        return jax.lax.cond(at_start, lambda: yj, interpolate)

    def step(self, tau: Any, y: Any, dt: Any, first_stage: str = "differentiable") -> StepResult:
        tau, dt = jax.lax.stop_gradient(tau), jax.lax.stop_gradient(dt)
        f0 = self.f(tau, y)
        if first_stage == "constant":
            f0 = jax.lax.stop_gradient(f0)
        self.nfe = self.nfe + self.tableau.stages
        c = self.controller
        return rk_step(self.f, self.tableau, tau, y, dt.astype(jnp.result_type(tau)), f0,
                       c.rtol, c.atol, c.norm)

    def initial_dt(self, tau: Any, y: Any) -> jax.Array:
        d = self.direction
        tau_s, t1_s = d * jax.lax.stop_gradient(tau), d * self.t1
        h = initial_step(_Negated(self.f, d), self.controller, self.solver, tau_s, y)
        self.nfe = self.nfe + 2
        return d * jnp.minimum(h, t1_s - tau_s)


def initial_step(f: Callable[..., Any], controller: dfx.PIDController, solver: Any, t: Any,
                 y: Any) -> jax.Array:
    """The ``PIDController``'s initial step selection at ``(t, y)`` (a constant).

    diffrax 0.7.2's ``diffeqsolve`` hands the controller a ``WrapTerm``, for which
    ``_select_initial_step`` returns 0.01; here the controller sees a plain ``ODETerm`` and runs
    its actual selection (Hairer's algorithm, two evaluations of ``f``)."""
    term = dfx.ODETerm(f if isinstance(f, _Negated) else _VectorField(f))
    t_next, _ = controller.init(term, t, t, y, None, None, solver.func, solver.error_order(term))
    return jax.lax.stop_gradient(t_next - t)


def first_dt(f: Callable[..., Any], controller: dfx.PIDController, solver: Any, t0: Any, t1: Any,
             y0: Any, direction: Any) -> jax.Array:
    """``dt0`` for ``diffeqsolve`` from ``t0`` to ``t1``: :func:`initial_step` in solver time
    ``s = direction * t`` (two evaluations of ``f``), at most ``|t1 - t0|``, with the sign of
    ``t1 - t0``; a constant. diffeqsolve's own selection never runs (it sees a ``WrapTerm``,
    see :func:`initial_step`): without this every solve would start with ``dt = 0.01``. A
    non-finite selection (``f(t0, y0)`` not finite) falls back to that 0.01."""
    s0, s1 = direction * t0, direction * t1
    h = initial_step(_Negated(f, direction), controller, solver, s0, y0).astype(s0.dtype)
    h = jnp.where(jnp.isfinite(h) & (h > 0), h, jnp.asarray(0.01, s0.dtype))
    return jax.lax.stop_gradient(direction * jnp.minimum(h, s1 - s0))


# -- the backend ----------------------------------------------------------------------------------
def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = sorted(set(options) - set(CONTROLLER_OPTIONS) - set(OTHER_OPTIONS))
    if unknown:
        allowed = ", ".join((*CONTROLLER_OPTIONS, *OTHER_OPTIONS))
        raise ValueError(
            f"unknown diffrax option(s) {unknown}; allowed: {allowed}. (regnde's own arguments "
            f"such as rtol, max_steps or sensitivity are keywords of solve.)"
        )
    ctrl = {k: v for k, v in options.items() if k in CONTROLLER_OPTIONS}
    other = {k: v for k, v in options.items() if k in OTHER_OPTIONS}
    return ctrl, other


def _is_sde(f: Any) -> bool:
    """An SDE object (drift ``f``, diffusion ``g``, ``noise_type``): see ``diffrax_sde``."""
    return hasattr(f, "g") and hasattr(f, "noise_type")


class DiffraxBackend(Backend):
    """``backend="diffrax"``: ``diffeqsolve`` with a ``PIDController``;
    ``RecursiveCheckpointAdjoint`` (direct) or ``BacksolveAdjoint`` (adjoint)."""

    name = "diffrax"
    framework = "jax"
    augments = True
    default_for = ("ode", "sde")
    install_hint = builtin(__name__).install
    distributed = "regnde.adapters.jax.distributed"
    dropin_hint = ("for unchanged diffrax.diffeqsolve code, the wrapper solver "
                   "regnde.diffrax.Regularized(solver, regularizer, key=...)")

    def native_methods(self) -> Mapping[str, Tableau | None]:
        return {name: native_tableau(name) for name in NATIVE}

    def aliases(self) -> Mapping[str, str]:
        return ALIASES

    def owns(self, y0: Any) -> bool:
        return isinstance(y0, jax.Array)

    def make_key(self, key: Any) -> JaxKey:
        return make_key(key)

    def sde_methods(self) -> Mapping[str, Tableau | None]:
        from regnde.adapters.jax.diffrax_sde import METHODS

        return dict.fromkeys(METHODS)

    def solve(self, request: SolveRequest) -> Solution:
        r = request
        if _is_sde(r.f):
            from regnde.adapters.jax.diffrax_sde import solve_sde

            return solve_sde(r)
        _check_y(r.y0, "y0")
        t = jnp.asarray(r.t)
        ctrl_opts, other = _split_options(r.options)
        capacity = other.get("trace_capacity", r.max_steps)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not (
                1 <= capacity <= r.max_steps):
            raise ValueError(
                f"trace_capacity must be an int in [1, max_steps={r.max_steps}], got "
                f"{capacity!r}."
            )
        traced = _traced(r.y0, t, r.key, r.f)
        key = make_key(r.key, traced)
        _check_f(r.f, t[0], r.y0)
        static = _Static(method=r.method, tableau=r.tableau, rtol=r.rtol, atol=r.atol,
                         sensitivity=r.sensitivity, regularizer=r.regularizer,
                         max_steps=r.max_steps, trace=r.trace, capacity=capacity,
                         controller=tuple(sorted(ctrl_opts.items())), dt0=other.get("dt0"),
                         traced=traced)
        if not traced and r.regularizer is not None:
            key._key()  # eager key=None: draw now, not once when compiling
        # One compiled call (inlined under an outer jit) instead of many small operations.
        out = _solve_jit(r.f, r.y0, t, key.key, static)
        if not traced:
            if bool(out["failure"]["result"] != dfx.RESULTS.successful):
                # diagnose a failed eager solve by running it again watching its trial steps
                # (a cost paid on failure only: the watch slows compiling by about a third)
                _NONFINITE.take()
                _solve_jit(r.f, r.y0, t, key.key, dataclasses.replace(static, watch=True))
            _check_result_eager(out, static)
        trace = Trace(**out["trace"])
        check_value(out["reg"], r.regularizer, trace, traced)
        return solution(out["ys"], trace, Stats(**out["stats"]), out["reg"])

    def step(self, request: StepRequest) -> StepResult:
        r = request
        if _is_sde(r.f):
            from regnde.adapters.jax.diffrax_sde import step_sde

            return step_sde(r)
        _check_y(r.y, "y")
        y = r.y
        t = jax.lax.stop_gradient(jnp.asarray(r.t, dtype=y.dtype))
        _check_f(r.f, t, y)
        ctrl_opts, other = _split_options(r.options)
        if other:
            raise ValueError(f"options {sorted(other)} apply to solve, not step.")
        tab = solver_tableau(r.method, r.tableau)
        controller = dfx.PIDController(rtol=r.rtol, atol=r.atol, **ctrl_opts)
        if r.dt is None:
            dt = initial_step(r.f, controller, make_solver(r.method, r.tableau), t, y)
        else:
            dt = jax.lax.stop_gradient(jnp.asarray(r.dt, dtype=y.dtype))
        return rk_step(r.f, tab, t, y, dt, r.f(t, y), controller.rtol, controller.atol,
                       controller.norm)


@dataclass(frozen=True)
class _Static:
    """The non-array part of a solve (hashable: the compiled core is cached on it)."""

    method: str
    tableau: Tableau | None
    rtol: float
    atol: float
    sensitivity: str
    regularizer: Any
    max_steps: int
    trace: str
    capacity: int
    controller: tuple[tuple[str, Any], ...]
    dt0: Any
    traced: bool
    watch: bool = False


def _solve(f: Any, y0: jax.Array, t: jax.Array, key: Any, st: _Static) -> dict[str, Any]:
    """The solve as a pure function of arrays: ``ys``, the trace's fields, stats, the
    regularizer's value; with ``st.traced`` failures become equinox runtime errors."""
    key = JaxKey(key, st.traced)
    t0, t1 = t[0], t[-1]
    tab = solver_tableau(st.method, st.tableau)
    solver = make_solver(st.method, st.tableau)
    controller = dfx.PIDController(rtol=st.rtol, atol=st.atol, **dict(st.controller))
    adjoint = st.sensitivity == "adjoint"
    reg = st.regularizer
    capacity = st.capacity
    direction = jnp.where(t1 >= t0, 1, -1).astype(t.dtype)
    # Integral regularizers: solve (y, r) with an error norm on y alone (jax/augment.py).
    aug = None
    if reg is not None and reg.needs_augmentation():
        from regnde.adapters.jax.augment import augment

        aug = augment(f, y0, reg, key, direction, controller)
    f_solve, state0 = (f, y0) if aug is None else (aug.field, aug.state0)
    if adjoint:
        # BacksolveAdjoint differentiates w.r.t. the term's array leaves only: make values
        # that f closes over (parameters traced by jax.grad) explicit leaves.
        f_solve = eqx.filter_closure_convert(f_solve, t0, state0)

    # States at step starts cost a (capacity, *y0.shape) buffer: only for trace="full". A
    # sampler that needs a state the solve did not announce (biased) gets it by a replay.
    plan = Plan(reg, key, t0, t1, st.trace, replays=True)
    keep_states = plan.keep_states
    probe_ts = None
    if plan.probes:
        probe_ts = direction * jax.lax.stop_gradient(
            jnp.stack(plan.probe_times()).astype(t.dtype))
    plain_solver = RecordingSolver(solver, tab, capacity, st.rtol, st.atol, controller.norm,
                                   probe_ts, watch=st.watch)
    rec_solver = plain_solver if aug is None else aug.recording(plain_solver)
    aug_controller = controller if aug is None else aug.controller
    term = dfx.ODETerm(_VectorField(f_solve))
    dt0 = st.dt0
    if dt0 is None:
        dt0 = first_dt(f, controller, solver, t0, t1, y0, direction)


    def run(term: Any, y0: Any, states: bool, adj: Any, plain: bool = aug is None) -> Any:
        if states:
            saveat = dfx.SaveAt(subs=[dfx.SubSaveAt(ts=t), dfx.SubSaveAt(steps=True)],
                                solver_state=True)
        else:
            saveat = dfx.SaveAt(ts=t, solver_state=True)
        return dfx.diffeqsolve(term, plain_solver if plain else rec_solver, t0, t1, dt0, y0,
                               saveat=saveat, adjoint=adj, max_steps=st.max_steps, throw=False,
                               stepsize_controller=controller if plain else aug_controller)

    if adjoint:
        backward: dict[str, Any] = dict(solver=solver, throw=True)
        if aug is not None:
            backward["stepsize_controller"] = aug.backward_controller
        sol = run(term, state0, False, dfx.BacksolveAdjoint(**backward))
        ys = sol.ys
        record = jax.lax.stop_gradient(sol.solver_state[1])
        steps_ys = None
        if keep_states:  # forward-only replay (same steps) for the states at step starts
            side_term = term if aug is None else dfx.ODETerm(_VectorField(f))
            side = run(_stop(side_term), jax.lax.stop_gradient(y0), True,
                       dfx.RecursiveCheckpointAdjoint(), plain=True)
            steps_ys = jax.lax.stop_gradient(side.ys[1])
    else:
        sol = run(term, state0, keep_states, dfx.RecursiveCheckpointAdjoint())
        ys, steps_ys = (sol.ys[0], sol.ys[1]) if keep_states else (sol.ys, None)
        if aug is not None and steps_ys is not None:
            steps_ys = steps_ys[0]
        record = sol.solver_state[1]
    integrals: dict[int, Any] = {}
    if aug is not None:
        ys, integrals = aug.split(ys)

    if st.traced:
        ys = _attach_errors(ys, sol.result, record, st.max_steps, capacity)

    mask = jnp.arange(capacity) < jnp.minimum(record["n"], capacity)
    y_trace = None
    if steps_ys is not None:
        starts = jnp.concatenate([y0[None], steps_ys[: capacity - 1]], axis=0)
        bmask = mask.reshape((-1,) + (1,) * y0.ndim)
        y_trace = jnp.where(bmask, starts, jnp.zeros_like(starts))
        if st.trace != "full":
            y_trace = jax.lax.stop_gradient(y_trace)
    trace = dict(
        t=direction * record["t"], dt=direction * jax.lax.stop_gradient(record["dt"]),
        mask=mask, n_steps=record["n"], error=record["error"],
        stiffness=record.get("stiffness"), y=y_trace,
    )
    first, later = evals_per_step(solver, tab)
    # evaluations of f: 2 for the initial step selection (first_dt, unless dt0 is given), s
    # for the first attempt, then s - 1 per attempt for FSAL methods (s, or s + 1 for generic
    # tableaus, otherwise), rejected attempts included (see docs/diffrax.md, "NFE")
    nfe = (2 if st.dt0 is None else 0) + first + (sol.stats["num_steps"] - 1) * later
    stats = dict(nfe=nfe, nfe_reg=0, n_steps=sol.stats["num_accepted_steps"],
                 n_rejected=sol.stats["num_rejected_steps"])
    value = None
    if reg is not None:
        captured = plan.captured(record["probes"]) if plan.probes else {}
        jrun = JaxRun(trace=Trace(**trace), t0=t0, t1=t1, sensitivity=st.sensitivity,
                      tableau=tab, f=f, solver=solver, controller=controller,
                      captured=captured, y0=y0, integrals=integrals)
        value, stats["nfe_reg"] = regularize(plan, jrun)
        if st.traced:
            value = eqx.error_if(value, ~jnp.isfinite(value), non_finite_regularizer(
                repr(reg), "the step is not known under jit"))
        if aug is not None:  # one integrand evaluation per evaluation of the augmented field
            stats["nfe_reg"] = stats["nfe_reg"] + first + (sol.stats["num_steps"] - 1) * later
    if st.trace == "summary":
        trace["y"] = None
    failure = dict(result=sol.result, n=record["n"], t=record["t"], dt=record["dt"],
                   direction=direction, t1=t1)
    return dict(ys=ys, trace=trace, stats=stats, reg=value, failure=failure)


_solve_jit = eqx.filter_jit(_solve)


@hookimpl
def regnde_register_backends(register: Callable[[str, Any], None]) -> None:
    register("diffrax", DiffraxBackend)
