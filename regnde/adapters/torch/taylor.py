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

from regnde.errors import TaylorModeError

__all__ = ["TaylorFallbackWarning", "TaylorModeError", "jvp_derivatives", "taylor_derivatives"]


class TaylorFallbackWarning(UserWarning):
    """An operation without a Taylor-mode rule ran through nested forward-mode jvp."""


class Coef:
    """Coefficient access for rules: ``C(x, j)`` is coefficient ``j`` of argument ``x`` (``None``
    for zero: constants beyond order 0); ``C.active(x)`` says whether ``x`` is traced."""

    def __init__(self, tape: _Tape) -> None:
        self.tape = tape

    def __call__(self, x: Any, j: int) -> Any:
        return self.tape.coef(x, j)

    def active(self, x: Any) -> bool:
        return self.tape.active(x)


class _Node:
    """One recorded operation (or an input): its primal output and Taylor coefficients."""

    __slots__ = ("args", "aux", "c", "func", "index", "kwargs", "name", "rule")

    def __init__(self, func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 out: torch.Tensor, rule: Any, index: int | None = None):
        self.func, self.name, self.args, self.kwargs = func, name, args, kwargs
        self.c: list[Any] = [out]  # tensors, None for zero
        self.aux: dict[str, list[Any]] = {}
        self.rule, self.index = rule, index

    @property
    def out(self) -> torch.Tensor:
        out = self.c[0]
        assert out is not None
        return out


# -- helpers ----------------------------------------------------------------------------------
def _sum(terms: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    total: torch.Tensor | None = None
    for x in terms:
        if x is not None:
            total = x if total is None else total + x
    return total


def _fit(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``x`` broadcast to the shape and dtype of the primal output ``like``."""
    if x is None:
        return None
    if x.dtype != like.dtype:
        x = x.to(like.dtype)
    if x.shape != like.shape:
        x = x.expand(like.shape)
    return x


def _scale(a: torch.Tensor | None, s: Any) -> torch.Tensor | None:
    return None if a is None else a * s


def _conv(op: Callable[[Any, Any], torch.Tensor], a: Any, b: Any, k: int, C: Coef
          ) -> torch.Tensor | None:
    """``sum_{j=0..k} op(a_j, b_{k-j})`` over the non-zero coefficients."""
    terms = []
    for j in range(k + 1):
        aj = C(a, j)
        if aj is None:
            continue
        bk = C(b, k - j)
        if bk is not None:
            terms.append(op(aj, bk))
    return _sum(terms)


def _chain(a: Any, series: list[Any], k: int, C: Coef, scale: Any = 1.0) -> torch.Tensor | None:
    """``(1/k) sum_{j=1..k} j * scale * a_j * series_{k-j}``: coefficient ``k`` of ``c`` where
    ``c' = series * scale * a'``."""
    terms = []
    for j in range(1, k + 1):
        aj = C(a, j)
        if aj is not None and series[k - j] is not None:
            terms.append((j * aj) * series[k - j])
    total = _sum(terms)
    if total is None:
        return None
    if isinstance(scale, (int, float)) and scale == 1:
        return total / k
    return total * (scale / k)


def _self_product(c: list[Any], m: int) -> torch.Tensor | None:
    """Coefficient ``m`` of ``c * c``."""
    return _sum([c[i] * c[m - i] for i in range(m + 1)
                 if c[i] is not None and c[m - i] is not None])


def _arg(node: _Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# -- rules: rule(node, k, C) -> coefficient k of the node's output (None = zero) -----------------
def _r_add(sign: float, swap: bool = False) -> Any:
    def rule(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
        a, b = node.args[0], _arg(node, 1, "other")
        alpha = node.kwargs.get("alpha", 1)
        # self +- alpha * other; swapped: other - alpha * self (__rsub__, rsub)
        first, second = (C(b, k), C(a, k)) if swap else (C(a, k), C(b, k))
        w = sign * alpha
        if second is not None and not (isinstance(w, (int, float)) and w == 1):
            second = second * w
        return _fit(_sum([first, second]), node.out)
    return rule


def _r_neg(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    ak = C(node.args[0], k)
    return None if ak is None else -ak


def _r_mul(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    return _fit(_conv(torch.mul, node.args[0], _arg(node, 1, "other"), k, C), node.out)


def _r_bilinear(op: Callable[[Any, Any], torch.Tensor], swap: bool = False) -> Any:
    def rule(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
        a, b = node.args[0], node.args[1]
        if swap:
            a, b = b, a
        return _conv(op, a, b, k, C)
    return rule


def _r_linear(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    x, w = node.args[0], _arg(node, 1, "weight")
    bias = _arg(node, 2, "bias")
    out = _conv(torch.nn.functional.linear, x, w, k, C)
    return _fit(_sum([out, C(bias, k) if bias is not None else None]), node.out)


def _r_addmm(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    bias, m1, m2 = node.args[0], node.args[1], node.args[2]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    prod = _conv(torch.mm, m1, m2, k, C)
    bk = C(bias, k)
    return _fit(_sum([_scale(bk, beta) if beta != 1 else bk,
                      _scale(prod, alpha) if alpha != 1 else prod]), node.out)


def _div(node: _Node, num: Any, den: Any, k: int, C: Coef) -> torch.Tensor | None:
    ak = C(num, k)
    if not C.active(den):
        return None if ak is None else _fit(ak / den, node.out)
    terms = [None if ak is None else ak]
    for j in range(1, k + 1):
        bj = C(den, j)
        if bj is not None and node.c[k - j] is not None:
            terms.append(-(bj * node.c[k - j]))
    total = _sum(terms)
    return None if total is None else _fit(total / C(den, 0), node.out)


def _r_div(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    return _div(node, node.args[0], _arg(node, 1, "other"), k, C)


def _r_rdiv(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    return _div(node, node.args[1], node.args[0], k, C)


def _r_reciprocal(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    return _div(node, 1.0, node.args[0], k, C)


def _pow(node: _Node, k: int, C: Coef, p: Any) -> torch.Tensor | None:
    a = node.args[0]
    if isinstance(p, (int, float)) and p == 2:
        return _self_product([C(a, j) for j in range(k + 1)], k)
    if isinstance(p, (int, float)) and p == 1:
        return C(a, k)
    if isinstance(p, (int, float)) and p == 0:
        return None
    # a c' = p a' c  =>  c_k = 1/(k a_0) sum_{j=1..k} (p j - (k - j)) a_j c_{k-j}
    terms = []
    for j in range(1, k + 1):
        aj = C(a, j)
        if aj is not None and node.c[k - j] is not None:
            terms.append((p * j - (k - j)) * aj * node.c[k - j])
    total = _sum(terms)
    return None if total is None else total / (k * C(a, 0))


def _r_pow(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    return _pow(node, k, C, _arg(node, 1, "exponent"))


def _r_pow_const(p: float) -> Any:
    def rule(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
        return _pow(node, k, C, p)
    return rule


def _r_rpow(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    """``base ** x`` (``x.__rpow__(base)``): ``c' = log(base) c x'``."""
    base = node.args[1]
    log_base = math.log(base) if isinstance(base, (int, float)) else torch.log(base)
    return _fit(_chain(node.args[0], node.c, k, C, scale=log_base), node.out)


def _r_exp(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    return _chain(node.args[0], node.c, k, C)


def _r_expm1(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    e = [node.out + 1, *node.c[1:]]
    return _chain(node.args[0], e, k, C)


def _log(node: _Node, k: int, a0: torch.Tensor, a: Any, C: Coef) -> torch.Tensor | None:
    # a c' = a'  =>  c_k = (a_k - 1/k sum_{j=1..k-1} j c_j a_{k-j}) / a_0
    terms = [C(a, k)]
    for j in range(1, k):
        aj = C(a, k - j)
        if aj is not None and node.c[j] is not None:
            terms.append(-(j / k) * node.c[j] * aj)
    total = _sum(terms)
    return None if total is None else total / a0


def _r_log(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    a = node.args[0]
    return _log(node, k, C(a, 0), a, C)


def _r_log1p(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    a = node.args[0]
    return _log(node, k, C(a, 0) + 1, a, C)


def _r_sincos(is_sin: bool) -> Any:
    def rule(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
        a = node.args[0]
        other = node.aux.setdefault("other", [torch.cos(C(a, 0)) if is_sin
                                              else torch.sin(C(a, 0))])
        # sin' = cos a', cos' = -sin a'
        ck = _chain(a, other, k, C, scale=1.0 if is_sin else -1.0)
        ok = _chain(a, node.c, k, C, scale=-1.0 if is_sin else 1.0)
        other.append(ok)
        return ck
    return rule


def _r_tanh(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    c = node.c
    d = node.aux.setdefault("d", [1 - c[0] * c[0]])  # tanh' = 1 - tanh^2
    ck = _chain(node.args[0], d, k, C)
    prod = _self_product([*c, ck], k)
    d.append(None if prod is None else -prod)
    return ck


def _sigmoid_step(s: list[Any], sd: list[Any], a: Any, k: int, C: Coef, scale: Any = 1.0
                  ) -> None:
    """Append coefficient ``k`` of ``s = sigmoid(scale * a)`` and of ``sd = s (1 - s)``."""
    sk = _chain(a, sd, k, C, scale=scale)
    s.append(sk)
    prod = _self_product(s, k)
    sd.append(_sum([sk, None if prod is None else -prod]))


def _r_sigmoid(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    c = node.c
    sd = node.aux.setdefault("sd", [c[0] - c[0] * c[0]])
    s = [*c]
    _sigmoid_step(s, sd, node.args[0], k, C)
    return s[k]


def _r_softplus(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    a = node.args[0]
    beta = _arg(node, 1, "beta", 1.0)
    threshold = _arg(node, 2, "threshold", 20.0)
    a0 = C(a, 0)
    if "s" not in node.aux:
        s0 = torch.sigmoid(beta * a0)
        node.aux["s"], node.aux["sd"] = [s0], [s0 - s0 * s0]
    s, sd = node.aux["s"], node.aux["sd"]
    ck = _chain(a, s, k, C)  # softplus' = sigmoid(beta a) a'
    _sigmoid_step(s, sd, a, k, C, scale=beta)
    ak = C(a, k)
    if ck is None and ak is None:
        return None
    zero = torch.zeros_like(a0)
    # softplus is the identity where beta * a > threshold
    return torch.where(beta * a0 > threshold, zero if ak is None else ak,
                       zero if ck is None else ck)


def _r_silu(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    a = node.args[0]
    if "s" not in node.aux:
        s0 = torch.sigmoid(C(a, 0))
        node.aux["s"], node.aux["sd"] = [s0], [s0 - s0 * s0]
    s, sd = node.aux["s"], node.aux["sd"]
    _sigmoid_step(s, sd, a, k, C)
    return _sum([C(a, j) * s[k - j] for j in range(k + 1)
                 if C(a, j) is not None and s[k - j] is not None])


def _r_piecewise(slope: Callable[[_Node, torch.Tensor], torch.Tensor]) -> Any:
    def rule(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
        a = node.args[0]
        ak = C(a, k)
        if ak is None:
            return None
        w = node.aux.get("w")
        if w is None:
            w = node.aux["w"] = [slope(node, C(a, 0))]
        return ak * w[0]
    return rule


def _relu_slope(node: _Node, a0: torch.Tensor) -> torch.Tensor:
    return (a0 > 0).to(a0.dtype)


def _leaky_slope(node: _Node, a0: torch.Tensor) -> torch.Tensor:
    neg = _arg(node, 1, "negative_slope", 0.01)
    return torch.where(a0 > 0, torch.ones_like(a0), torch.full_like(a0, neg))


def _abs_slope(node: _Node, a0: torch.Tensor) -> torch.Tensor:
    return torch.sign(a0)


def _r_unary_linear(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    ak = C(node.args[0], k)
    if ak is None:
        return None
    out = node.func(ak, *node.args[1:], **node.kwargs)
    return out if node.index is None else out[node.index]


def _r_seq(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    seq = node.args[0]
    parts = [C(x, k) for x in seq]
    if all(p is None for p in parts):
        return None
    parts = [torch.zeros_like(x) if p is None else p for x, p in zip(seq, parts, strict=True)]
    return node.func(parts, *node.args[1:], **node.kwargs)


def _r_where(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
    cond, a, b = node.args[0], _arg(node, 1, "input"), _arg(node, 2, "other")
    if isinstance(cond, torch.Tensor) and cond.is_floating_point():  # a.where(cond, b)
        a, cond = cond, a
    ak, bk = C(a, k), C(b, k)
    if ak is None and bk is None:
        return None
    zero = torch.zeros((), dtype=node.out.dtype, device=node.out.device)
    return _fit(torch.where(cond, zero if ak is None else ak, zero if bk is None else bk),
                node.out)


RULES: dict[str, Any] = {
    "add": _r_add(1.0), "__add__": _r_add(1.0), "__radd__": _r_add(1.0),
    "sub": _r_add(-1.0), "subtract": _r_add(-1.0), "__sub__": _r_add(-1.0),
    "__rsub__": _r_add(-1.0, swap=True), "rsub": _r_add(-1.0, swap=True),
    "neg": _r_neg, "negative": _r_neg, "__neg__": _r_neg,
    "mul": _r_mul, "multiply": _r_mul, "__mul__": _r_mul, "__rmul__": _r_mul,
    "div": _r_div, "divide": _r_div, "true_divide": _r_div, "__truediv__": _r_div,
    "__div__": _r_div, "__rdiv__": _r_rdiv, "__rtruediv__": _r_rdiv,
    "reciprocal": _r_reciprocal,
    "matmul": _r_bilinear(torch.matmul), "__matmul__": _r_bilinear(torch.matmul),
    "__rmatmul__": _r_bilinear(torch.matmul, swap=True), "mm": _r_bilinear(torch.mm),
    "bmm": _r_bilinear(torch.bmm), "mv": _r_bilinear(torch.mv),
    "outer": _r_bilinear(torch.outer), "dot": _r_bilinear(torch.dot),
    "linear": _r_linear, "addmm": _r_addmm,
    "pow": _r_pow, "__pow__": _r_pow, "__rpow__": _r_rpow,
    "square": _r_pow_const(2), "sqrt": _r_pow_const(0.5), "rsqrt": _r_pow_const(-0.5),
    "exp": _r_exp, "expm1": _r_expm1, "log": _r_log, "log1p": _r_log1p,
    "sin": _r_sincos(True), "cos": _r_sincos(False),
    "tanh": _r_tanh, "sigmoid": _r_sigmoid, "softplus": _r_softplus, "silu": _r_silu,
    "relu": _r_piecewise(_relu_slope), "leaky_relu": _r_piecewise(_leaky_slope),
    "abs": _r_piecewise(_abs_slope),
    "cat": _r_seq, "concat": _r_seq, "concatenate": _r_seq, "stack": _r_seq,
    "where": _r_where,
}
_UNARY_LINEAR = (
    "positive", "reshape", "view", "view_as", "reshape_as", "expand", "expand_as", "broadcast_to",
    "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "T", "mT",
    "movedim", "swapaxes", "contiguous", "clone", "__getitem__", "narrow", "select",
    "index_select", "gather", "sum", "mean", "cumsum", "flip", "roll", "repeat", "tile",
    "diagonal", "split", "chunk", "unbind", "to", "type_as", "double", "float",
)
RULES.update({name: _r_unary_linear for name in _UNARY_LINEAR})

#: Operations whose output does not depend on the input's value (zero derivatives).
CONSTANT = frozenset({
    "detach", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "sign",
    "floor", "ceil", "round", "trunc", "argmax", "argmin",
})
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
        self.nodes: dict[int, _Node] = {}
        self.order: list[_Node] = []
        self.fallback = fallback

    def input(self, x: torch.Tensor, name: str) -> _Node:
        node = _Node(None, name, (), {}, x, None)
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
        if rule is _r_pow and self.active(_arg_of(args, kwargs, 1, "exponent")):
            rule = None
        if rule in (_r_div, _r_mul) and kwargs.get("rounding_mode") is not None:
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
                node = _Node(func, name, tuple(args), dict(kwargs), o, rule,
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


def _fallback(node: _Node, k: int, C: Coef) -> torch.Tensor | None:
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
