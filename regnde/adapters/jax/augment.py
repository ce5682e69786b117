"""Integral regularizers on JAX (TayNODE, RNODE): the :class:`regnde.backend.Point` of the
diffrax backend, Taylor-mode total derivatives by ``jax.experimental.jet``, and the augmented
vector field ``(t, (y, r)) -> (f(t, y), sign * [g_1, ..., g_m])``.

Used by the diffrax adapter; nothing here depends on diffrax.

Taylor mode (:func:`taylor_derivatives`) follows the TayNODE reference (easy-neural-ode): time
is part of the jet (``t`` with series ``(1, 0, 0, ...)``), so the derivatives are total time
derivatives of the solution, time-dependent fields included; ``y^(k+1)`` is the ``k``-th series
term of ``f`` along the jet whose input series are ``y', ..., y^(k)`` (``K - 1`` calls of
``jet`` after ``f`` itself).

``jet`` ignores custom differentiation rules and, in JAX 0.10, fails with
``UnexpectedTracerError`` on functions that have them (``jax.nn.relu``, ``jax.nn.softplus``,
``jnp.logaddexp``, ...). regnde therefore runs ``f`` through a small jaxpr interpreter that
inlines ``custom_jvp``/``custom_vjp`` calls (their primal implementation, e.g.
``max(x, 0)`` for relu, which ``jet`` has rules for) and nested ``jit`` calls before handing it
to ``jet``. Primitives without a ``jet`` rule raise :class:`regnde.errors.TaylorModeError`
naming the primitive and the fallback ``TaylorDerivative(K, mode="jvp")`` (nested
``jax.jvp``, cost ``O(2^K)``, which works through everything JAX differentiates).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax.experimental.jet import jet

from regnde.errors import TaylorModeError

__all__ = ["AugmentedField", "JaxPoint", "TaylorModeError", "jvp_derivatives",
           "taylor_derivatives"]

#: primitives whose sub-jaxpr is evaluated inline (their custom rules are dropped).
_INLINE = {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
           "custom_vjp_call_jaxpr": "fun_jaxpr", "jit": "jaxpr", "pjit": "jaxpr"}


def _eval_inlined(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate ``jaxpr`` with custom-derivative and ``jit`` calls inlined (recursively)."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        sub = eqn.params.get(_INLINE.get(name, ""))
        if sub is not None:
            closed = sub if isinstance(sub, jex.ClosedJaxpr) else jex.ClosedJaxpr(sub, ())
            outs = _eval_inlined(closed.jaxpr, closed.consts, invals)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            subfuns: tuple[Any, ...] = ()
            if isinstance(params, tuple):  # JAX < 0.7: (subfuns, params)
                subfuns, params = params
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*subfuns, *invals, **params)
            outs = list(out) if eqn.primitive.multiple_results else [out]
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jex.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def inlined(f: Callable[[Any, Any], Any], t: Any, y: Any) -> Callable[[Any, Any], Any]:
    """``f`` as a function of ``(t, y)`` that ``jet`` can trace: custom-derivative and ``jit``
    calls inlined. Values ``f`` closes over (parameters, possibly traced) stay constants of the
    traced program, so derivatives w.r.t. them flow as usual."""
    closed = jax.make_jaxpr(f)(t, y)

    def g(t: Any, y: Any) -> Any:
        (out,) = _eval_inlined(closed.jaxpr, closed.consts, [t, y])
        return out

    return g


def _missing_rule(exc: Exception) -> str | None:
    """The primitive ``jet`` found no rule for (``jet_rules[primitive]`` raised), or ``None``."""
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], jex.Primitive):
        return str(exc.args[0].name)
    msg = str(exc)
    if isinstance(exc, NotImplementedError) and "Jet rule for" in msg:
        return msg.split("Jet rule for", 1)[1].split("not implemented", 1)[0].strip(" '\"")
    return None


def taylor_derivatives(f: Callable[[Any, Any], Any], t: Any, y: Any, order: int) -> list[Any]:
    """``[y', y'', ..., y^(order)]`` at ``(t, y)`` for ``y' = f(t, y)`` by Taylor mode
    (``jax.experimental.jet``), total time derivatives; each ``y.shape``.

    Raises:
        TaylorModeError: ``f`` uses a primitive ``jet`` has no rule for (named)."""
    _check_order(order)
    t = jnp.asarray(t, dtype=jnp.result_type(t))
    g = inlined(f, t, y)
    y1 = g(t, y)
    derivs = [y1]
    one, zero = jnp.ones_like(t), jnp.zeros_like(t)
    for k in range(1, order):
        t_series = [one] + [zero] * (k - 1)
        try:
            _, series = jet(g, (t, y), (t_series, list(derivs)))
        except (KeyError, NotImplementedError) as exc:
            prim = _missing_rule(exc)
            if prim is None:
                raise
            raise TaylorModeError(
                f"TaylorDerivative: jax.experimental.jet has no Taylor rule for the primitive "
                f"{prim!r} used by f. Use TaylorDerivative({order}, mode='jvp') (nested "
                f"jax.jvp, cost O(2^K)), or write f with operations jet supports."
            ) from exc
        derivs.append(series[k - 1])
    return derivs


def jvp_derivatives(f: Callable[[Any, Any], Any], t: Any, y: Any, order: int) -> list[Any]:
    """The same derivatives by nested first-order ``jax.jvp`` of Lie derivatives
    ``g_{k+1}(t, y) = dg_k/dt + (dg_k/dy) f(t, y)``, cost ``O(2^order)``."""
    _check_order(order)
    t = jnp.asarray(t)
    gs: list[Callable[[Any, Any], Any]] = [f]
    for _ in range(1, order):
        prev = gs[-1]

        def nxt(t: Any, y: Any, prev: Callable[[Any, Any], Any] = prev) -> Any:
            return jax.jvp(prev, (t, y), (jnp.ones_like(t), f(t, y)))[1]

        gs.append(nxt)
    return [g(t, y) for g in gs]


def _check_order(order: Any) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1, got {order!r}.")


class JaxPoint:
    """:class:`regnde.backend.Point` at ``(t, y)`` on JAX; computes what is asked once.

    ``f()`` is ``f(t, y)`` called as the plain solve calls it (its value is what the solve
    integrates); Taylor mode and ``vjp`` run their own passes for the integrands."""

    def __init__(self, f: Callable[[Any, Any], Any], t: Any, y: Any):
        self.fn, self.t, self.y = f, t, y
        self._f: Any = None
        self._derivs: dict[str, list[Any]] = {}

    def f(self) -> Any:
        if self._f is None:
            self._f = self.fn(self.t, self.y)
        return self._f

    def derivatives(self, order: int, mode: str = "taylor") -> list[Any]:
        have = self._derivs.get(mode)
        if have is None or len(have) < order:
            if mode == "taylor":
                have = taylor_derivatives(self.fn, self.t, self.y, order)
            elif mode == "jvp":
                have = jvp_derivatives(self.fn, self.t, self.y, order)
            else:
                raise ValueError(f"derivative mode must be 'taylor' or 'jvp', got {mode!r}.")
            self._derivs[mode] = have
        return have[:order]

    def vjp(self, e: Any) -> Any:
        _, pullback = jax.vjp(lambda y: self.fn(self.t, y), self.y)
        (g,) = pullback(e.astype(self.y.dtype))
        return g


class AugmentedField:
    """``(t, (y, r)) -> (f(t, y), sign * stack([g(point) for g in integrands]))``.

    Args:
        f: the user's field ``f(t, y)``. integrands: :class:`regnde.regularizers.Integrand`
            objects (their noise already drawn). sign: ``sign(t1 - t0)`` (an array), so that
            ``r(t1)`` integrates with ``|dt|``.
    """

    def __init__(self, f: Callable[[Any, Any], Any], integrands: Sequence[Any], sign: Any):
        self.f = f
        self.integrands = list(integrands)
        self.sign = sign
        self.orders: dict[str, int] = {}
        for it in self.integrands:
            if it.order:
                self.orders[it.mode] = max(self.orders.get(it.mode, 0), it.order)

    def __call__(self, t: Any, state: tuple[Any, Any]) -> tuple[Any, Any]:
        y = state[0]
        point = JaxPoint(self.f, t, y)
        for mode, order in self.orders.items():
            point.derivatives(order, mode)
        dy = point.f()
        values = [jnp.reshape(it.fn(point), ()).astype(y.dtype) for it in self.integrands]
        dr = jnp.stack(values) * self.sign.astype(y.dtype)
        return dy, dr



def _first(state: Any) -> Any:
    return state[0]


class Augmented:
    """The augmented problem of one solve: the field, ``(y0, 0)``, the controllers, and how
    to read ``r``.

    ``controller`` steers the forward solve with the plain controller's norm on ``y`` alone
    (so the steps are those of the plain solve); ``backward_controller`` (for
    ``BacksolveAdjoint``, whose state is ``(y, r, adjoints...)``) uses diffrax's default RMS
    norm over everything."""

    def __init__(self, f: Callable[[Any, Any], Any], y0: Any, reg: Any, key: Any,
                 sign: Any, controller: Any):
        self.integrands = reg.integrands(key, y0)
        self.field = AugmentedField(f, self.integrands, sign)
        self.state0 = (y0, jnp.zeros(len(self.integrands), dtype=y0.dtype))
        plain_norm = controller.norm

        def norm_on_y(state: Any) -> Any:
            return plain_norm(state[0])

        self.controller = dataclasses.replace(controller, norm=norm_on_y)
        self.backward_controller = dataclasses.replace(controller, norm=_default_norm())

    def recording(self, plain: Any) -> Any:
        """The recording solver ``plain`` looking at ``y`` only."""
        return dataclasses.replace(plain, part=_first)

    def split(self, ys: Any) -> tuple[Any, dict[int, Any]]:
        """``ys`` of the user's state and ``{id(owner): r(t1)}`` from the saved ``(ys, rs)``."""
        y, r = ys
        return y, {id(it.owner): r[-1, i] for i, it in enumerate(self.integrands)}


def _default_norm() -> Callable[[Any], Any]:
    import optimistix as optx

    return optx.rms_norm


def augment(f: Callable[[Any, Any], Any], y0: Any, reg: Any, key: Any, sign: Any,
            controller: Any) -> Augmented:
    """The augmented problem for the integral terms of ``reg`` (noise drawn from ``key``)."""
    return Augmented(f, y0, reg, key, sign, controller)
