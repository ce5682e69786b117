"""The diffrax backend, a regnde plugin: ODEs and SDEs, one solve for both.

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
that is not FSAL evaluates ``f(t1, y1)`` for it: one evaluation more per step). They live in
:mod:`.ode_methods`.

SDEs (an object with drift ``f``, diffusion ``g`` and ``noise_type``, as on torchsde) run the
same solve on ``MultiTerm(ODETerm(drift), ControlTerm(diffusion, VirtualBrownianTree))``
(:mod:`.sde_terms`) with diffrax's step doubling ``HalfSolver(<method>)`` (:mod:`.sde_methods`).
What differs between the two reaches the solve as :class:`.run.Parts`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp

from regnde.adapters import builtin
from regnde.adapters.jax.common import (
    _NONFINITE,
    CONTROLLER_OPTIONS,
    JaxKey,
    _attach_errors,
    _check_f,
    _check_result_eager,
    _check_y,
    _stop,
    _traced,
    make_key,
)
from regnde.adapters.jax.ode_methods import (
    ALIASES,
    NATIVE,
    OTHER_OPTIONS,
    initial_step,
    make_solver,
    native_tableau,
    ode_parts,
    rk_step,
    solver_tableau,
)
from regnde.adapters.jax.sde_methods import (
    METHODS,
    SDE_OPTIONS,
    SdeKind,
    check_sde,
    is_sde,
    sde_kind,
    sde_method,
    sde_parts,
    step_sde,
)
from regnde.backend import Backend, SolveRequest, StepRequest
from regnde.engine import Plan, check_value, regularize, solution
from regnde.errors import non_finite_regularizer
from regnde.plugins.hookspecs import hookimpl
from regnde.tableau import Tableau
from regnde.trace import Solution, Stats, StepResult, Trace


def split_options(options: Mapping[str, Any], sde: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(PIDController fields, the backend's other options)``; unknown options are errors."""
    other_options = SDE_OPTIONS if sde else OTHER_OPTIONS
    unknown = sorted(set(options) - set(CONTROLLER_OPTIONS) - set(other_options))
    if unknown:
        allowed = ", ".join((*CONTROLLER_OPTIONS, *other_options))
        raise ValueError(
            f"unknown diffrax SDE option(s) {unknown}; allowed: {allowed}." if sde else
            f"unknown diffrax option(s) {unknown}; allowed: {allowed}. (regnde's own arguments "
            f"such as rtol, max_steps or sensitivity are keywords of solve.)"
        )
    ctrl = {k: v for k, v in options.items() if k in CONTROLLER_OPTIONS}
    other = {k: v for k, v in options.items() if k in other_options}
    return ctrl, other


def _check_input(f: Any, y: Any, what: str) -> bool:
    """Whether ``f`` is an SDE (then checked as one); checks the state ``y``."""
    sde = is_sde(f)
    if sde:
        check_sde(f)
    _check_y(y, what)
    return sde


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
        return dict.fromkeys(METHODS)

    def solve(self, request: SolveRequest) -> Solution:
        r = request
        sde = _check_input(r.f, r.y0, "y0")
        t = jnp.asarray(r.t)
        traced = _traced(r.y0, t, r.key, r.f)
        method = sde_method(r.method, r.f, t, traced, r.sensitivity) if sde else r.method
        ctrl_opts, other = split_options(r.options, sde)
        capacity = other.get("trace_capacity", r.max_steps)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not (
                1 <= capacity <= r.max_steps):
            raise ValueError(
                f"trace_capacity must be an int in [1, max_steps={r.max_steps}], got "
                f"{capacity!r}."
            )
        key = make_key(r.key, traced)
        _check_f(r.f.f if sde else r.f, t[0], r.y0)
        kind = sde_kind(r.f, t[0], r.y0, other) if sde else None
        bm = other.get("bm")
        static = _Static(method=method, tableau=None if sde else r.tableau, rtol=r.rtol,
                         atol=r.atol, sensitivity=r.sensitivity, regularizer=r.regularizer,
                         max_steps=r.max_steps, trace=r.trace, capacity=capacity,
                         controller=tuple(sorted(ctrl_opts.items())), dt0=other.get("dt0"),
                         traced=traced, sde=kind)
        if not traced and (r.regularizer is not None or (sde and bm is None)):
            key._key()  # eager key=None: draw now, not once when compiling
        # One compiled call (inlined under an outer jit) instead of many small operations.
        out = _solve_jit(r.f, r.y0, t, key.key, bm, static)
        if not traced:
            if not sde and bool(out["failure"]["result"] != dfx.RESULTS.successful):
                # diagnose a failed eager solve by running it again watching its trial steps
                # (a cost paid on failure only: the watch slows compiling by about a third)
                _NONFINITE.take()
                _solve_jit(r.f, r.y0, t, key.key, bm, dataclasses.replace(static, watch=True))
            _check_result_eager(out, static)
        trace = Trace(**out["trace"])
        check_value(out["reg"], r.regularizer, trace, traced)
        return solution(out["ys"], trace, Stats(**out["stats"]), out["reg"])

    def step(self, request: StepRequest) -> StepResult:
        r, y = request, request.y
        sde = _check_input(r.f, y, "y")
        t = jax.lax.stop_gradient(jnp.asarray(r.t, dtype=y.dtype))
        if sde:
            return step_sde(r, t)
        _check_f(r.f, t, y)
        ctrl_opts, other = split_options(r.options, sde)
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
    sde: SdeKind | None = None  # None: an ODE


def _solve(f: Any, y0: jax.Array, t: jax.Array, key: Any, bm: Any, st: _Static
           ) -> dict[str, Any]:
    """The solve, ODE or SDE, as a pure function of arrays: ``ys``, the trace's fields, stats,
    the regularizer's value; with ``st.traced`` failures become equinox runtime errors."""
    key = JaxKey(key, st.traced)
    t0, t1 = t[0], t[-1]
    controller = dfx.PIDController(rtol=st.rtol, atol=st.atol, **dict(st.controller))
    p = (ode_parts(f, y0, t, key, st, controller) if st.sde is None else
         sde_parts(f, y0, t, key, bm, st, controller))
    adjoint = st.sensitivity == "adjoint"
    reg, capacity, direction, aug = st.regularizer, st.capacity, p.direction, p.aug

    # States at step starts cost a (capacity, *y0.shape) buffer: only for trace="full". A
    # sampler that needs a state the solve did not announce (biased) gets it by a replay.
    plan = Plan(reg, key, t0, t1, st.trace, replays=True)
    keep_states = plan.keep_states
    probe_ts = None
    if plan.probes:
        probe_ts = direction * jax.lax.stop_gradient(
            jnp.stack(plan.probe_times()).astype(t.dtype))
    plain_solver = p.recording(p.solver, p.tab, capacity, st.rtol, st.atol, controller.norm,
                               probe_ts, watch=st.watch)
    rec_solver = plain_solver if aug is None else aug.recording(plain_solver)
    aug_controller = controller if aug is None else aug.controller

    def run(terms: Any, y0: Any, states: bool, adj: Any, plain: bool = aug is None) -> Any:
        if states:
            saveat = dfx.SaveAt(subs=[dfx.SubSaveAt(ts=t), dfx.SubSaveAt(steps=True)],
                                solver_state=True)
        else:
            saveat = dfx.SaveAt(ts=t, solver_state=True)
        return dfx.diffeqsolve(terms, plain_solver if plain else rec_solver, t0, t1, p.dt0, y0,
                               saveat=saveat, adjoint=adj, max_steps=st.max_steps, throw=False,
                               stepsize_controller=controller if plain else aug_controller)

    if adjoint:
        backward: dict[str, Any] = dict(solver=p.solver, throw=True)
        if aug is not None:
            backward["stepsize_controller"] = aug.backward_controller
        sol = run(p.terms, p.state0, False, dfx.BacksolveAdjoint(**backward))
        ys = sol.ys
        record = jax.lax.stop_gradient(sol.solver_state[1])
        steps_ys = None
        if keep_states:  # forward-only replay (same steps) for the states at step starts
            side_terms = p.terms if aug is None else p.plain_terms
            side = run(_stop(side_terms), jax.lax.stop_gradient(y0), True,
                       dfx.RecursiveCheckpointAdjoint(), plain=True)
            steps_ys = jax.lax.stop_gradient(side.ys[1])
    else:
        sol = run(p.terms, p.state0, keep_states, dfx.RecursiveCheckpointAdjoint())
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
    # evaluations of f (the drift): choosing dt0, the solver's, rejected attempts included
    nfe = p.selection + p.evals.count(sol.stats["num_steps"])
    stats = dict(nfe=nfe, nfe_reg=0, n_steps=sol.stats["num_accepted_steps"],
                 n_rejected=sol.stats["num_rejected_steps"])
    value = None
    if reg is not None:
        captured = plan.captured(record["probes"]) if plan.probes else {}
        value, stats["nfe_reg"] = regularize(plan, p.make_run(
            trace=Trace(**trace), captured=captured, integrals=integrals))
        if st.traced:
            value = eqx.error_if(value, ~jnp.isfinite(value), non_finite_regularizer(
                repr(reg), "the step is not known under jit"))
        if aug is not None:  # one integrand evaluation per evaluation of the augmented field
            stats["nfe_reg"] = stats["nfe_reg"] + p.evals.steps(sol.stats["num_steps"])
    if st.trace == "summary":
        trace["y"] = None
    failure = dict(result=sol.result, n=record["n"], t=record["t"], dt=record["dt"],
                   direction=direction, t1=t1)
    return dict(ys=ys, trace=trace, stats=stats, reg=value, failure=failure)


_solve_jit = eqx.filter_jit(_solve)


@hookimpl
def regnde_register_backends(register: Callable[[str, Any], None]) -> None:
    register("diffrax", DiffraxBackend)
