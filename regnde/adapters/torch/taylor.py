"""Taylor-mode total time derivatives of an ODE solution on torch (TayNODE).

For ``dy/dt = f(t, y)`` and a point ``(t, y)``, :func:`taylor_derivatives` returns the total time
derivatives ``d^k y / dt^k`` (``k = 1..K``) of the solution through that point, time-dependent
fields included. How:

1. ``f(t, y)`` runs once under a :class:`torch.overrides.TorchFunctionMode` that records every
   operation touching ``t``, ``y`` or a value computed from them (a tape). The operations run
   unchanged, so the recorded output is bit for bit ``f(t, y)``.
2. The tape is replayed order by order on normalised Taylor coefficients
   (``x(t + s) = sum_k x_k s^k``): coefficient ``k`` of every recorded value from coefficients
   ``0..k`` of its inputs, then ``y_{k+1} = f_k / (k + 1)``. Each rule costs ``O(k)`` at order
   ``k``, so all ``K`` derivatives cost ``O(K^2)`` passes over the tape (``jax.experimental.jet``
   re-propagates whole jets per order instead).

Operations with a Taylor rule (torch functions, ``Tensor`` methods and operators alike):

- linear: ``add``, ``sub``, ``rsub``, ``neg``, ``positive``, ``cat``/``concat``/``concatenate``,
  ``stack``, ``where``, ``reshape``, ``view``, ``view_as``, ``reshape_as``, ``expand``,
  ``expand_as``, ``broadcast_to``, ``flatten``, ``unflatten``, ``squeeze``, ``unsqueeze``,
  ``permute``, ``transpose``, ``t``, ``T``, ``mT``, ``movedim``, ``swapaxes``, ``contiguous``,
  ``clone``, indexing (``__getitem__``), ``narrow``, ``select``, ``index_select``, ``gather``,
  ``sum``, ``mean``, ``cumsum``, ``flip``, ``roll``, ``repeat``, ``tile``, ``diagonal``,
  ``split``, ``chunk``, ``unbind``, ``to``, ``type_as``, ``double``, ``float``;
- bilinear: ``mul``, ``matmul``/``@``, ``mm``, ``bmm``, ``mv``, ``outer``, ``dot``, ``linear``
  (``nn.Linear``), ``addmm``;
- ``div`` (either side traced), ``reciprocal``, ``pow``/``**`` with a constant exponent,
  ``square``, ``sqrt``, ``rsqrt``, constant ``**`` traced (``__rpow__``);
- ``exp``, ``expm1``, ``log``, ``log1p``, ``sin``, ``cos``, ``tanh``, ``sigmoid``, ``softplus``
  (with ``beta`` and ``threshold``), ``silu``, ``relu``, ``leaky_relu``, ``abs`` (the last three
  piecewise: derivatives of the branch at the point).

The rules are in :mod:`regnde.adapters.torch.taylor_rules` (over the series arithmetic of
:mod:`regnde.adapters.torch.taylor_series`); this module holds the tape, the fallback and the
entry points.

Any other operation on a traced value falls back to nested first-order forward mode
(``torch.func.jvp``) for that operation alone, with a :class:`TaylorFallbackWarning` naming it;
its cost grows like ``2^K``. Turn the warning into an error with
``warnings.simplefilter("error", TaylorFallbackWarning)``. In-place operations on traced values
raise :class:`TaylorModeError`. Operations that return integers/booleans, and ``detach``,
``zeros_like``, ``sign``, ``floor``, ... are constants (zero derivatives).

Everything is built from differentiable torch operations: the derivatives are differentiable
w.r.t. ``y``, ``t`` and the parameters of ``f`` (backpropagation and the adjoint both work).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from regnde.adapters.torch.taylor_rules import CONSTANT, RULES, rule_div, rule_mul, rule_pow
from regnde.adapters.torch.taylor_series import Coef, Node
from regnde.errors import TaylorModeError

__all__ = ["TaylorFallbackWarning", "TaylorModeError", "jvp_derivatives", "taylor_derivatives"]


class TaylorFallbackWarning(UserWarning):
    """An operation without a Taylor-mode rule ran through nested forward-mode jvp."""


_NOT_INPLACE = frozenset({"requires_grad_", "retain_grad", "share_memory_"})
_INPLACE_DUNDER = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                             "__idiv__", "__ipow__", "__imatmul__", "__iand__", "__ior__"})
_TO_PYTHON = frozenset({"item", "tolist", "__float__", "__int__", "numpy"})


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a property such as Tensor.T
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _describe(func: Any) -> str:
    mod = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", None) or _op_name(func)
    return f"{mod}.{qual}" if mod else qual


def _is_inplace(name: str, kwargs: dict[str, Any]) -> bool:
    if name in _INPLACE_DUNDER or kwargs.get("inplace") is True or "out" in kwargs:
        return True
    return name.endswith("_") and not name.startswith("__") and name not in _NOT_INPLACE


# -- the tape -----------------------------------------------------------------------------------
class _Tape(TorchFunctionMode):
    """Records the operations of one call that touch the traced inputs."""

    def __init__(self, fallback: str) -> None:
        super().__init__()
        self.nodes: dict[int, Node] = {}
        self.order: list[Node] = []
        self.fallback = fallback

    def input(self, x: torch.Tensor, name: str) -> Node:
        node = Node(None, name, (), {}, x, None)
        self.nodes[id(x)] = node
        return node

    def active(self, x: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return id(x) in self.nodes
        if isinstance(x, (list, tuple)):
            return any(isinstance(e, torch.Tensor) and id(e) in self.nodes for e in x)
        return False

    def coef(self, x: Any, j: int) -> Any:
        if isinstance(x, torch.Tensor):
            node = self.nodes.get(id(x))
            if node is not None:
                return node.c[j]
        return x if j == 0 else None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not (any(self.active(a) for a in args)
                or any(self.active(v) for v in kwargs.values())):
            return out
        name = _op_name(func)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if name not in _TO_PYTHON and not any(
                isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())
                for o in outs):
            return out  # .shape, .dim(), comparisons, integer results: constants
        if _is_inplace(name, kwargs):
            raise TaylorModeError(
                f"Taylor mode cannot trace the in-place operation {_describe(func)} on a value "
                f"computed from (t, y); write the vector field with out-of-place operations "
                f"(x = x + 1, torch.cat, torch.where) instead."
            )
        if name in _TO_PYTHON:
            warnings.warn(
                f"{_describe(func)} turns a value computed from (t, y) into a Python number; "
                f"Taylor mode treats it as a constant (its time derivatives are lost).",
                TaylorFallbackWarning, stacklevel=2)
            return out
        if name in CONSTANT:
            return out
        rule = RULES.get(name)
        if rule is rule_pow and self.active(_arg_of(args, kwargs, 1, "exponent")):
            rule = None
        if rule in (rule_div, rule_mul) and kwargs.get("rounding_mode") is not None:
            return out  # floor/trunc division: piecewise constant
        if rule is None:
            if self.fallback == "error":
                raise TaylorModeError(
                    f"no Taylor-mode rule for {_describe(func)}; rules cover "
                    f"{', '.join(sorted(RULES))}. Use fallback='jvp' for nested forward mode."
                )
            warnings.warn(
                f"TaylorDerivative: no Taylor-mode rule for {_describe(func)}; using nested "
                f"forward-mode jvp (torch.func.jvp) for this operation, whose cost grows like "
                f"2^K with the order K.", TaylorFallbackWarning, stacklevel=2)
            rule = _fallback
        for i, o in enumerate(outs):
            if id(o) in self.nodes:  # the same tensor back (x.to(x.dtype), x.contiguous())
                continue
            if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex()):
                node = Node(func, name, tuple(args), dict(kwargs), o, rule,
                            index=i if isinstance(out, (tuple, list)) else None)
                self.nodes[id(o)] = node
                self.order.append(node)
        return out


def _arg_of(args: Any, kwargs: dict[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


# -- nested forward mode ---------------------------------------------------------------------
def _nth_derivative(h: Callable[[torch.Tensor], torch.Tensor], k: int
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``s -> d^k h / ds^k`` by ``k`` nested ``torch.func.jvp`` (cost ``2^k`` evaluations)."""
    if k == 0:
        return h
    inner = _nth_derivative(h, k - 1)

    def d(s: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(inner, (s,), (torch.ones_like(s),))[1]
    return d


def _poly(coeffs: Sequence[torch.Tensor], s: torch.Tensor) -> torch.Tensor:
    out = coeffs[0]
    for j in range(1, len(coeffs)):
        out = out + coeffs[j] * s**j
    return out


def _fallback(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    """Coefficient ``k`` of one operation by nested forward mode on its input polynomials."""
    def series(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and C.active(x):
            return [C(x, j) if C(x, j) is not None else torch.zeros_like(x) for j in range(k + 1)]
        return None

    def substitute(x: Any, s: torch.Tensor) -> Any:
        ser = series(x)
        if ser is not None:
            return _poly(ser, s)
        if isinstance(x, (list, tuple)):
            return type(x)(substitute(e, s) for e in x)
        return x

    def h(s: torch.Tensor) -> torch.Tensor:
        args = tuple(substitute(a, s) for a in node.args)
        kwargs = {n: substitute(v, s) for n, v in node.kwargs.items()}
        out = node.func(*args, **kwargs)
        return out if node.index is None else out[node.index]

    s0 = torch.zeros((), dtype=node.out.dtype, device=node.out.device)
    try:
        d = _nth_derivative(h, k)(s0)
    except Exception as exc:
        raise TaylorModeError(
            f"no Taylor-mode rule for {_describe(node.func)} and nested forward mode failed on "
            f"it: {exc}"
        ) from exc
    return d / math.factorial(k)


# -- entry points ------------------------------------------------------------------------------
def taylor_coefficients(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        t: torch.Tensor, y: torch.Tensor, order: int,
                        fallback: str = "jvp") -> list[torch.Tensor]:
    """Normalised Taylor coefficients ``[y_0, y_1, ..., y_order]`` of the solution of
    ``dy/dt = f(t, y)`` through ``(t, y)``: ``y(t + s) = sum_k y_k s^k``, so
    ``d^k y / dt^k = k! y_k``.

    Args:
        f: the vector field, built from torch operations (see the module docstring).
        t: scalar time (0-d tensor). y: the state, any shape.
        order: ``K >= 1``.
        fallback: ``"jvp"`` (nested forward mode for operations without a rule, with a
            :class:`TaylorFallbackWarning`) or ``"error"``.

    Returns:
        ``order + 1`` tensors of ``y.shape``; ``y_1`` is ``f(t, y)`` bit for bit. Differentiable
        w.r.t. ``t``, ``y`` and the parameters of ``f``.
    """
    _check_order(order)
    tape = _Tape(fallback)
    t_node = tape.input(t, "t")
    y_node = tape.input(y, "y")
    with tape:
        out = f(t, y)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"f(t, y) must return a tensor, got {type(out).__name__}.")
    out_node = tape.nodes.get(id(out))
    ys: list[torch.Tensor | None] = [y, out]
    C = Coef(tape)
    for k in range(1, order):
        t_node.c.append(torch.ones_like(t) if k == 1 else None)
        y_node.c.append(ys[k])
        for node in tape.order:
            node.c.append(node.rule(node, k, C))
        fk = out_node.c[k] if out_node is not None else None
        ys.append(None if fk is None else fk / (k + 1))
    return [torch.zeros_like(y) if c is None else c for c in ys]


def taylor_derivatives(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       t: torch.Tensor, y: torch.Tensor, order: int,
                       fallback: str = "jvp") -> list[torch.Tensor]:
    """Total time derivatives ``[dy/dt, d^2y/dt^2, ..., d^order y/dt^order]`` of the solution
    of ``dy/dt = f(t, y)`` through ``(t, y)``, by Taylor mode (``O(order^2)`` cost).

    Each has ``y.shape``; the first is ``f(t, y)`` bit for bit. Differentiable w.r.t. ``t``,
    ``y`` and the parameters of ``f``. See :func:`taylor_coefficients` for the arguments.
    """
    cs = taylor_coefficients(f, t, y, order, fallback=fallback)
    return [math.factorial(k) * cs[k] if k > 1 else cs[k] for k in range(1, order + 1)]


def jvp_derivatives(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    t: torch.Tensor, y: torch.Tensor, order: int) -> list[torch.Tensor]:
    """The same derivatives as :func:`taylor_derivatives` by nested first-order forward mode
    alone (``torch.func.jvp`` on the whole field): cost grows like ``2^order``. A reference
    and the fallback's cost model; differentiable like :func:`taylor_derivatives`."""
    _check_order(order)
    fy = f(t, y)
    ys = [y, fy]
    for k in range(1, order):
        coeffs = list(ys)

        def h(s: torch.Tensor, coeffs: list[torch.Tensor] = coeffs) -> torch.Tensor:
            return f(t + s, _poly(coeffs, s))

        s0 = torch.zeros((), dtype=y.dtype, device=y.device)
        fk = _nth_derivative(h, k)(s0) / math.factorial(k)
        ys.append(fk / (k + 1))
    return [fy, *(math.factorial(k) * ys[k] for k in range(2, order + 1))]


def _check_order(order: Any) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"the derivative order must be an int >= 1, got {order!r}.")
