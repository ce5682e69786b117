"""ODE methods of the diffrax backend: diffrax's own adaptive RK solvers and the tableaus they
run, a generic ``diffrax.AbstractERK`` for a registered :class:`regnde.Tableau` that diffrax
lacks (cubic Hermite dense output), one RK step (:func:`rk_step`), the ``PIDController``'s
initial step selection, the ODE side of a solve (:func:`ode_parts`: terms, first step,
evaluation counts, integral regularizers as extra states) and the Run of an ODE solve
(:class:`OdeRun`). The solve itself is :mod:`.diffrax`'s, shared with SDEs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx

from regnde.adapters.jax.common import (
    JaxKey,
    RecordingSolver,
    _VectorField,
    scaled_error,
    stiffness,
)
from regnde.adapters.jax.run import DiffraxRun, Evals, Parts
from regnde.tableau import Tableau, equal_c_pair
from regnde.trace import StepResult

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
    """The tableau that :func:`make_solver`'s solver for ``method`` runs."""
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


class OdeRun(DiffraxRun):
    """The Run of an ODE solve: local steps of the solve's tableau on ``f``, the controller's
    initial step selection."""

    def __init__(self, *, f: Callable[[Any, Any], Any], tableau: Tableau, **common: Any):
        super().__init__(**common)
        self.f, self.tableau = f, tableau
        self.direction = jnp.where(self.t1 >= self.t0, 1, -1).astype(jnp.result_type(self.t0))

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


def ode_parts(f: Callable[[Any, Any], Any], y0: jax.Array, t: jax.Array, key: JaxKey, st: Any,
              controller: dfx.PIDController) -> Parts:
    """The ODE side of the solve in :mod:`.diffrax` (``st``: its static part). Integral
    regularizers solve ``(y, r)`` with an error norm on ``y`` alone (:mod:`.augment`)."""
    t0, t1 = t[0], t[-1]
    tab = solver_tableau(st.method, st.tableau)
    solver = make_solver(st.method, st.tableau)
    direction = jnp.where(t1 >= t0, 1, -1).astype(t.dtype)
    reg = st.regularizer
    aug = None
    if reg is not None and reg.needs_augmentation():
        from regnde.adapters.jax.augment import augment

        aug = augment(f, y0, reg, key, direction, controller)
    f_solve, state0 = (f, y0) if aug is None else (aug.field, aug.state0)
    if st.sensitivity == "adjoint":
        # BacksolveAdjoint differentiates w.r.t. the term's array leaves only: make values
        # that f closes over (parameters traced by jax.grad) explicit leaves.
        f_solve = eqx.filter_closure_convert(f_solve, t0, state0)
    dt0 = st.dt0
    if dt0 is None:
        dt0 = first_dt(f, controller, solver, t0, t1, y0, direction)
    # evaluations of f: 2 for the initial step selection (first_dt, unless dt0 is given), s
    # for the first attempt, then s - 1 per attempt for FSAL methods (s, or s + 1 for generic
    # tableaus, otherwise), rejected attempts included (see docs/diffrax.md, "NFE")
    evals = Evals(0, *evals_per_step(solver, tab))
    plain = dfx.ODETerm(_VectorField(f))
    make_run = functools.partial(OdeRun, t0=t0, t1=t1, y0=y0, sensitivity=st.sensitivity,
                                 terms=plain, solver=solver, controller=controller, evals=evals,
                                 f=f, tableau=tab)
    return Parts(solver=solver, recording=RecordingSolver, tab=tab,
                 terms=dfx.ODETerm(_VectorField(f_solve)), plain_terms=plain, state0=state0,
                 dt0=dt0, selection=2 if st.dt0 is None else 0, evals=evals,
                 direction=direction, aug=aug, make_run=make_run)
