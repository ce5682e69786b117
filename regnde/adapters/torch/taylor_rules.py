"""The Taylor-mode rules: coefficient ``k`` of an operation's output from coefficients
``0..k`` of its inputs, one rule per torch operation (:data:`RULES`, by the operation's name),
and the operations whose output has zero derivatives (:data:`CONSTANT`).

A rule is ``rule(node, k, C) -> coefficient k of node's output`` (``None`` for zero), with
``C`` the :class:`regnde.adapters.torch.taylor_series.Coef` of the tape; it may keep series of
its own in ``node.aux`` (``tanh'``, ``sigmoid``, ...). Each costs ``O(k)`` at order ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from regnde.adapters.torch.taylor_series import (
    Coef,
    Node,
    chain_rule,
    convolve,
    fit_to,
    node_arg,
    scaled,
    self_product,
    sum_terms,
)


# -- rules: rule(node, k, C) -> coefficient k of the node's output (None = zero) -----------------
def rule_add(sign: float, swap: bool = False) -> Any:
    def rule(node: Node, k: int, C: Coef) -> torch.Tensor | None:
        a, b = node.args[0], node_arg(node, 1, "other")
        alpha = node.kwargs.get("alpha", 1)
        # self +- alpha * other; swapped: other - alpha * self (__rsub__, rsub)
        first, second = (C(b, k), C(a, k)) if swap else (C(a, k), C(b, k))
        w = sign * alpha
        if second is not None and not (isinstance(w, (int, float)) and w == 1):
            second = second * w
        return fit_to(sum_terms([first, second]), node.out)
    return rule


def rule_neg(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    ak = C(node.args[0], k)
    return None if ak is None else -ak


def rule_mul(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    return fit_to(convolve(torch.mul, node.args[0], node_arg(node, 1, "other"), k, C), node.out)


def rule_bilinear(op: Callable[[Any, Any], torch.Tensor], swap: bool = False) -> Any:
    def rule(node: Node, k: int, C: Coef) -> torch.Tensor | None:
        a, b = node.args[0], node.args[1]
        if swap:
            a, b = b, a
        return convolve(op, a, b, k, C)
    return rule


def rule_linear(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    x, w = node.args[0], node_arg(node, 1, "weight")
    bias = node_arg(node, 2, "bias")
    out = convolve(torch.nn.functional.linear, x, w, k, C)
    return fit_to(sum_terms([out, C(bias, k) if bias is not None else None]), node.out)


def rule_addmm(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    bias, m1, m2 = node.args[0], node.args[1], node.args[2]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    prod = convolve(torch.mm, m1, m2, k, C)
    bk = C(bias, k)
    return fit_to(sum_terms([scaled(bk, beta) if beta != 1 else bk,
                             scaled(prod, alpha) if alpha != 1 else prod]), node.out)


def _div(node: Node, num: Any, den: Any, k: int, C: Coef) -> torch.Tensor | None:
    ak = C(num, k)
    if not C.active(den):
        return None if ak is None else fit_to(ak / den, node.out)
    terms = [None if ak is None else ak]
    for j in range(1, k + 1):
        bj = C(den, j)
        if bj is not None and node.c[k - j] is not None:
            terms.append(-(bj * node.c[k - j]))
    total = sum_terms(terms)
    return None if total is None else fit_to(total / C(den, 0), node.out)


def rule_div(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    return _div(node, node.args[0], node_arg(node, 1, "other"), k, C)


def rule_rdiv(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    return _div(node, node.args[1], node.args[0], k, C)


def rule_reciprocal(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    return _div(node, 1.0, node.args[0], k, C)


def _pow(node: Node, k: int, C: Coef, p: Any) -> torch.Tensor | None:
    a = node.args[0]
    if isinstance(p, (int, float)) and p == 2:
        return self_product([C(a, j) for j in range(k + 1)], k)
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
    total = sum_terms(terms)
    return None if total is None else total / (k * C(a, 0))


def rule_pow(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    return _pow(node, k, C, node_arg(node, 1, "exponent"))


def rule_pow_const(p: float) -> Any:
    def rule(node: Node, k: int, C: Coef) -> torch.Tensor | None:
        return _pow(node, k, C, p)
    return rule


def rule_rpow(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    """``base ** x`` (``x.__rpow__(base)``): ``c' = log(base) c x'``."""
    base = node.args[1]
    log_base = math.log(base) if isinstance(base, (int, float)) else torch.log(base)
    return fit_to(chain_rule(node.args[0], node.c, k, C, scale=log_base), node.out)


def rule_exp(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    return chain_rule(node.args[0], node.c, k, C)


def rule_expm1(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    e = [node.out + 1, *node.c[1:]]
    return chain_rule(node.args[0], e, k, C)


def _log(node: Node, k: int, a0: torch.Tensor, a: Any, C: Coef) -> torch.Tensor | None:
    # a c' = a'  =>  c_k = (a_k - 1/k sum_{j=1..k-1} j c_j a_{k-j}) / a_0
    terms = [C(a, k)]
    for j in range(1, k):
        aj = C(a, k - j)
        if aj is not None and node.c[j] is not None:
            terms.append(-(j / k) * node.c[j] * aj)
    total = sum_terms(terms)
    return None if total is None else total / a0


def rule_log(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    a = node.args[0]
    return _log(node, k, C(a, 0), a, C)


def rule_log1p(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    a = node.args[0]
    return _log(node, k, C(a, 0) + 1, a, C)


def rule_sincos(is_sin: bool) -> Any:
    def rule(node: Node, k: int, C: Coef) -> torch.Tensor | None:
        a = node.args[0]
        other = node.aux.setdefault("other", [torch.cos(C(a, 0)) if is_sin
                                              else torch.sin(C(a, 0))])
        # sin' = cos a', cos' = -sin a'
        ck = chain_rule(a, other, k, C, scale=1.0 if is_sin else -1.0)
        ok = chain_rule(a, node.c, k, C, scale=-1.0 if is_sin else 1.0)
        other.append(ok)
        return ck
    return rule


def rule_tanh(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    c = node.c
    d = node.aux.setdefault("d", [1 - c[0] * c[0]])  # tanh' = 1 - tanh^2
    ck = chain_rule(node.args[0], d, k, C)
    prod = self_product([*c, ck], k)
    d.append(None if prod is None else -prod)
    return ck


def _sigmoid_step(s: list[Any], sd: list[Any], a: Any, k: int, C: Coef, scale: Any = 1.0
                  ) -> None:
    """Append coefficient ``k`` of ``s = sigmoid(scale * a)`` and of ``sd = s (1 - s)``."""
    sk = chain_rule(a, sd, k, C, scale=scale)
    s.append(sk)
    prod = self_product(s, k)
    sd.append(sum_terms([sk, None if prod is None else -prod]))


def rule_sigmoid(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    c = node.c
    sd = node.aux.setdefault("sd", [c[0] - c[0] * c[0]])
    s = [*c]
    _sigmoid_step(s, sd, node.args[0], k, C)
    return s[k]


def rule_softplus(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    a = node.args[0]
    beta = node_arg(node, 1, "beta", 1.0)
    threshold = node_arg(node, 2, "threshold", 20.0)
    a0 = C(a, 0)
    if "s" not in node.aux:
        s0 = torch.sigmoid(beta * a0)
        node.aux["s"], node.aux["sd"] = [s0], [s0 - s0 * s0]
    s, sd = node.aux["s"], node.aux["sd"]
    ck = chain_rule(a, s, k, C)  # softplus' = sigmoid(beta a) a'
    _sigmoid_step(s, sd, a, k, C, scale=beta)
    ak = C(a, k)
    if ck is None and ak is None:
        return None
    zero = torch.zeros_like(a0)
    # softplus is the identity where beta * a > threshold
    return torch.where(beta * a0 > threshold, zero if ak is None else ak,
                       zero if ck is None else ck)


def rule_silu(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    a = node.args[0]
    if "s" not in node.aux:
        s0 = torch.sigmoid(C(a, 0))
        node.aux["s"], node.aux["sd"] = [s0], [s0 - s0 * s0]
    s, sd = node.aux["s"], node.aux["sd"]
    _sigmoid_step(s, sd, a, k, C)
    return sum_terms([C(a, j) * s[k - j] for j in range(k + 1)
                      if C(a, j) is not None and s[k - j] is not None])


def rule_piecewise(slope: Callable[[Node, torch.Tensor], torch.Tensor]) -> Any:
    def rule(node: Node, k: int, C: Coef) -> torch.Tensor | None:
        a = node.args[0]
        ak = C(a, k)
        if ak is None:
            return None
        w = node.aux.get("w")
        if w is None:
            w = node.aux["w"] = [slope(node, C(a, 0))]
        return ak * w[0]
    return rule


def _relu_slope(node: Node, a0: torch.Tensor) -> torch.Tensor:
    return (a0 > 0).to(a0.dtype)


def _leaky_slope(node: Node, a0: torch.Tensor) -> torch.Tensor:
    neg = node_arg(node, 1, "negative_slope", 0.01)
    return torch.where(a0 > 0, torch.ones_like(a0), torch.full_like(a0, neg))


def _abs_slope(node: Node, a0: torch.Tensor) -> torch.Tensor:
    return torch.sign(a0)


def rule_unary_linear(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    ak = C(node.args[0], k)
    if ak is None:
        return None
    out = node.func(ak, *node.args[1:], **node.kwargs)
    return out if node.index is None else out[node.index]


def rule_seq(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    seq = node.args[0]
    parts = [C(x, k) for x in seq]
    if all(p is None for p in parts):
        return None
    parts = [torch.zeros_like(x) if p is None else p for x, p in zip(seq, parts, strict=True)]
    return node.func(parts, *node.args[1:], **node.kwargs)


def rule_where(node: Node, k: int, C: Coef) -> torch.Tensor | None:
    cond, a, b = node.args[0], node_arg(node, 1, "input"), node_arg(node, 2, "other")
    if isinstance(cond, torch.Tensor) and cond.is_floating_point():  # a.where(cond, b)
        a, cond = cond, a
    ak, bk = C(a, k), C(b, k)
    if ak is None and bk is None:
        return None
    zero = torch.zeros((), dtype=node.out.dtype, device=node.out.device)
    return fit_to(torch.where(cond, zero if ak is None else ak, zero if bk is None else bk),
                  node.out)


RULES: dict[str, Any] = {
    "add": rule_add(1.0), "__add__": rule_add(1.0), "__radd__": rule_add(1.0),
    "sub": rule_add(-1.0), "subtract": rule_add(-1.0), "__sub__": rule_add(-1.0),
    "__rsub__": rule_add(-1.0, swap=True), "rsub": rule_add(-1.0, swap=True),
    "neg": rule_neg, "negative": rule_neg, "__neg__": rule_neg,
    "mul": rule_mul, "multiply": rule_mul, "__mul__": rule_mul, "__rmul__": rule_mul,
    "div": rule_div, "divide": rule_div, "true_divide": rule_div, "__truediv__": rule_div,
    "__div__": rule_div, "__rdiv__": rule_rdiv, "__rtruediv__": rule_rdiv,
    "reciprocal": rule_reciprocal,
    "matmul": rule_bilinear(torch.matmul), "__matmul__": rule_bilinear(torch.matmul),
    "__rmatmul__": rule_bilinear(torch.matmul, swap=True), "mm": rule_bilinear(torch.mm),
    "bmm": rule_bilinear(torch.bmm), "mv": rule_bilinear(torch.mv),
    "outer": rule_bilinear(torch.outer), "dot": rule_bilinear(torch.dot),
    "linear": rule_linear, "addmm": rule_addmm,
    "pow": rule_pow, "__pow__": rule_pow, "__rpow__": rule_rpow,
    "square": rule_pow_const(2), "sqrt": rule_pow_const(0.5), "rsqrt": rule_pow_const(-0.5),
    "exp": rule_exp, "expm1": rule_expm1, "log": rule_log, "log1p": rule_log1p,
    "sin": rule_sincos(True), "cos": rule_sincos(False),
    "tanh": rule_tanh, "sigmoid": rule_sigmoid, "softplus": rule_softplus, "silu": rule_silu,
    "relu": rule_piecewise(_relu_slope), "leaky_relu": rule_piecewise(_leaky_slope),
    "abs": rule_piecewise(_abs_slope),
    "cat": rule_seq, "concat": rule_seq, "concatenate": rule_seq, "stack": rule_seq,
    "where": rule_where,
}
_UNARY_LINEAR = (
    "positive", "reshape", "view", "view_as", "reshape_as", "expand", "expand_as", "broadcast_to",
    "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "T", "mT",
    "movedim", "swapaxes", "contiguous", "clone", "__getitem__", "narrow", "select",
    "index_select", "gather", "sum", "mean", "cumsum", "flip", "roll", "repeat", "tile",
    "diagonal", "split", "chunk", "unbind", "to", "type_as", "double", "float",
)
RULES.update({name: rule_unary_linear for name in _UNARY_LINEAR})

#: Operations whose output does not depend on the input's value (zero derivatives).
CONSTANT = frozenset({
    "detach", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
    "randint_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "sign",
    "floor", "ceil", "round", "trunc", "argmax", "argmin",
})
