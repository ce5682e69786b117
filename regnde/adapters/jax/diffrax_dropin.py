"""The drop-in for unchanged ``diffrax.diffeqsolve`` code: a wrapper solver.

diffrax has no solver table to swap, so regularization rides in a wrapper solver, the route
diffrax's maintainers suggest for error regularization (diffrax issue 196)::

    solver = regnde.diffrax.Regularized(diffrax.Tsit5(), R.LocalError(sampler="unbiased"),
                                        key=it, span=(t0, t1), rtol=1e-6, atol=1e-6)
    sol = diffrax.diffeqsolve(term, solver, t0, t1, dt0, y0,
                              stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
                              saveat=diffrax.SaveAt(t1=True, solver_state=True))
    loss = task_loss(sol.ys) + lam * regnde.diffrax.value(sol)

The wrapper's steps are the wrapped solver's own (same ``ys``, same accepted steps); its solver
state carries the regularizer's running value, and diffrax rolls solver states back on rejected
steps, so only accepted steps count. ``rtol``/``atol`` must be the controller's (they scale the
error the way the controller does). Works for every adaptive diffrax solver with an error
estimate (explicit and implicit, e.g. ``Kvaerno5``), under ``jax.jit`` and ``jax.grad`` with
``RecursiveCheckpointAdjoint`` (diffrax's default).

Supported terms (weighted sums of them too):

- ``GlobalError()`` (``reduction="sum"``): ``sum_j E_j |dt_j|`` over accepted steps.
- ``LocalError(sampler="unbiased")`` with ``dt="recorded"``: ``tau ~ U[t0, t1]`` from ``key``
  (``span=(t0, t1)`` tells the wrapper the solve's interval, which diffrax does not pass to a
  solver; the same ``key`` draws the same ``tau`` as ``regnde.solve(..., key=key)``);
  the accepted step that contains ``tau`` takes one extra step of the wrapped solver from
  ``(tau, u(tau))`` with its own size (``u(tau)`` from the dense output, a constant), and
  contributes that step's scaled error times ``|dt|``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from diffrax._term import WrapTerm  # diffrax's own direction wrapper (pinned 0.7.2)

from regnde.adapters.jax.common import ForwardingSolver, make_key, scaled_error
from regnde.regularizers import GlobalError, LocalError, as_regularizer
from regnde.samplers import Unbiased

SUPPORTED = ('GlobalError() (reduction="sum") and LocalError(sampler="unbiased", '
             'dt="recorded"), and weighted sums of them')


def _terms(regularizer: Any) -> tuple[tuple[float, str], ...]:
    """``(weight, kind)`` per term, ``kind`` ``"global"`` or ``"local"``; ``ValueError`` for
    anything the wrapper cannot compute inside the solve."""
    out = []
    for weight, r in as_regularizer(regularizer).terms():
        if isinstance(r, GlobalError) and r.reduction == "sum":
            out.append((float(weight), "global"))
        elif (isinstance(r, LocalError) and isinstance(r.sampler, Unbiased)
              and r.dt == "recorded" and r.samples == 1 and r.state == "constant"):
            out.append((float(weight), "local"))
        else:
            raise ValueError(
                f"regnde.diffrax.Regularized computes {SUPPORTED} inside diffrax's solve; got "
                f"{r!r}. For other regularizers use regnde.solve(f, y0, t, backend='diffrax', "
                f"regularizer=...)."
            )
    return tuple(out)


class Regularized(ForwardingSolver):  # type: ignore[misc]
    """A diffrax solver that is ``solver`` plus a regularizer carried in its solver state.

    Args:
        solver: any adaptive diffrax solver (it must have an error estimate).
        regularizer: see the module docstring for the supported terms.
        key: a JAX PRNG key (or int seed): the sampled time of ``LocalError``.
        span: ``(t0, t1)`` of the ``diffeqsolve`` call (needed by ``LocalError``).
        rtol, atol: the step-size controller's tolerances.
        norm: the controller's norm (diffrax's default: RMS).
    """

    solver: dfx.AbstractAdaptiveSolver  # type: ignore[misc]
    key: Any
    span: Any
    rtol: Any
    atol: Any
    terms_: tuple[tuple[float, str], ...] = eqx.field(static=True)
    norm: Callable[[Any], Any] = eqx.field(static=True)

    def __init__(self, solver: Any, regularizer: Any, key: Any = None, span: Any = None,
                 rtol: Any = 1e-6, atol: Any = 1e-6,
                 norm: Callable[[Any], Any] = optx.rms_norm):
        if not isinstance(solver, dfx.AbstractAdaptiveSolver):
            raise ValueError(
                f"regnde.diffrax.Regularized wraps an adaptive diffrax solver (one with an "
                f"error estimate, e.g. diffrax.Tsit5() or diffrax.Kvaerno5()); got {solver!r}."
            )
        self.solver = solver
        self.terms_ = _terms(regularizer)
        if any(kind == "local" for _, kind in self.terms_) and (key is None or span is None):
            raise ValueError(
                "LocalError samples a time in the solve's interval: pass key= (a PRNG key or "
                "int seed) and span=(t0, t1), the t0 and t1 of your diffeqsolve call "
                f"(got key={key!r}, span={span!r})."
            )
        self.key = None if key is None else make_key(key).key
        self.span = None if span is None else (jnp.asarray(span[0]), jnp.asarray(span[1]))
        self.rtol, self.atol, self.norm = rtol, atol, norm

    @property
    def root_finder(self) -> Any:
        """An implicit solver's root finder (diffeqsolve sets its tolerances through here)."""
        return self.solver.root_finder  # type: ignore[attr-defined]

    def init(self, terms: Any, t0: Any, t1: Any, y0: Any, args: Any) -> Any:
        inner = self.solver.init(terms, t0, t1, y0, args)
        dtype = jnp.result_type(*jax.tree.leaves(y0))
        taus = []
        for i, (_, kind) in enumerate(self.terms_):
            if kind == "local":  # as regnde.solve draws it: term i of a sum folds in i
                assert self.span is not None
                a, b = self.span
                key = self.key if len(self.terms_) == 1 else jax.random.fold_in(self.key, i)
                u = jax.random.uniform(key, (), dtype=jnp.result_type(a))
                direction = jnp.where(b >= a, 1.0, -1.0).astype(jnp.result_type(t0))
                taus.append(direction * (a + u * (b - a)))  # diffrax's solver time
            else:
                taus.append(t0)
        n = len(self.terms_)
        return inner, {"value": jnp.zeros((), dtype), "tau": jnp.stack(taus),
                       "u": jax.tree.map(lambda x: jnp.zeros((n, *x.shape), x.dtype), y0),
                       "h": jnp.zeros((n,), jnp.result_type(t0))}

    def step(self, terms: Any, t0: Any, t1: Any, y0: Any, args: Any, solver_state: Any,
             made_jump: Any) -> Any:
        inner, st = solver_state
        y1, y_error, dense, inner, result = self.solver.step(terms, t0, t1, y0, args, inner,
                                                             made_jump)
        dt = jnp.abs(t1 - t0)
        value, us, hs = st["value"], st["u"], st["h"]
        vdtype = value.dtype
        for i, (weight, kind) in enumerate(self.terms_):
            if kind == "global":
                err = scaled_error(y0, y1, y_error, self.rtol, self.atol, self.norm)
                value = value + weight * (err * dt).astype(value.dtype)
            else:
                tau = st["tau"][i]
                inside = (tau >= t0) & (tau < t1)

                def local(us: Any, hs: Any, tau: Any = tau, i: int = i) -> Any:
                    interp = self.solver.interpolation_cls(t0=t0, t1=t1, **dense)
                    u = jax.lax.stop_gradient(interp.evaluate(tau))
                    h = jax.lax.stop_gradient(t1 - t0)
                    e = self.local_error(terms, args, tau, u, h).astype(vdtype)
                    us = jax.tree.map(lambda a, b: a.at[i].set(b.astype(a.dtype)), us, u)
                    return e, us, hs.at[i].set(h)

                contribution, us, hs = jax.lax.cond(
                    inside, local, lambda us, hs: (jnp.zeros((), vdtype), us, hs), us, hs)
                value = value + weight * contribution
        new = {"value": value, "tau": st["tau"], "u": us, "h": hs}
        return y1, y_error, dense, (inner, new), result

    def local_error(self, terms: Any, args: Any, tau: Any, u: Any, h: Any) -> Any:
        """One step of the wrapped solver from ``(tau, u)`` of size ``h`` (solver time): its
        scaled error times ``|h|``; differentiable w.r.t. the vector field's parameters."""
        s0 = self.solver.init(terms, tau, tau + h, u, args)
        y1, err, _, _, _ = self.solver.step(terms, tau, tau + h, u, args, s0, False)
        return scaled_error(u, y1, err, self.rtol, self.atol, self.norm) * jnp.abs(h)

    def replay(self, sol: Any, terms: Any, args: Any = None) -> jax.Array:
        """The local terms' value recomputed outside the solve from what it recorded
        (``tau``, ``u(tau)``, the step size: constants), differentiable w.r.t. ``terms`` and
        ``args``. This is the value to use with ``BacksolveAdjoint``, whose gradients do not
        reach the solver state."""
        if any(kind == "global" for _, kind in self.terms_):
            raise ValueError(
                "GlobalError sums over every step inside the solve; its gradient needs "
                "diffrax's RecursiveCheckpointAdjoint (the default) and regnde.diffrax.value"
                "(sol). With BacksolveAdjoint regularize with LocalError alone."
            )
        st = _state(sol)
        assert self.span is not None
        direction = jnp.where(self.span[1] >= self.span[0], 1.0, -1.0)
        wrapped = jax.tree.map(lambda t: WrapTerm(t, direction), terms,
                               is_leaf=lambda x: isinstance(x, dfx.AbstractTerm))
        total = jnp.zeros((), st["value"].dtype)
        for i, (weight, _) in enumerate(self.terms_):
            u = jax.tree.map(lambda a, i=i: a[i], st["u"])
            total = total + weight * self.local_error(wrapped, args, st["tau"][i], u,
                                                      st["h"][i]).astype(total.dtype)
        return total


def value(sol: Any) -> jax.Array:
    """The regularizer's value of a ``diffeqsolve`` run with :class:`Regularized` (a scalar,
    differentiable through the solve with ``RecursiveCheckpointAdjoint``; with
    ``BacksolveAdjoint`` use ``solver.replay(sol, terms, args)``)."""
    return _state(sol)["value"]


def _state(sol: Any) -> Any:
    state = getattr(sol, "solver_state", None)
    if state is None:
        raise ValueError(
            "regnde.diffrax.value needs the solver state: pass saveat=diffrax.SaveAt(..., "
            "solver_state=True) to diffeqsolve, with solver=regnde.diffrax.Regularized(...)."
        )
    try:
        ours = state[1]
        if "tau" not in ours:  # a Regularized state has it
            raise KeyError("tau")
        return ours
    except (TypeError, KeyError, IndexError):
        raise ValueError(
            "this solution was not computed with regnde.diffrax.Regularized(...) as the solver; "
            "wrap your solver: solver=regnde.diffrax.Regularized(diffrax.Tsit5(), regularizer, "
            "key=..., rtol=..., atol=...)."
        ) from None
