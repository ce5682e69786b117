"""Truncated Taylor series as the Taylor-mode rules see them: a recorded operation
(:class:`Node`) with its coefficients, coefficient access (:class:`Coef`), and the series
arithmetic the rules of :mod:`regnde.adapters.torch.taylor_rules` share (sums, convolutions,
the chain rule ``c' = series * a'``).

Coefficients are normalised (``x(t + s) = sum_k x_k s^k``); ``None`` stands for a zero
coefficient (constants beyond order 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch


class Coefficients(Protocol):
    """Where :class:`Coef` reads coefficients from: the tape of
    :mod:`regnde.adapters.torch.taylor`."""

    def coef(self, x: Any, j: int) -> Any:
        """Coefficient ``j`` of ``x`` (``None`` for zero)."""
        ...

    def active(self, x: Any) -> bool:
        """Whether ``x`` is traced (computed from ``t`` or ``y``)."""
        ...


class Coef:
    """Coefficient access for rules: ``C(x, j)`` is coefficient ``j`` of argument ``x`` (``None``
    for zero: constants beyond order 0); ``C.active(x)`` says whether ``x`` is traced."""

    def __init__(self, tape: Coefficients) -> None:
        self.tape = tape

    def __call__(self, x: Any, j: int) -> Any:
        return self.tape.coef(x, j)

    def active(self, x: Any) -> bool:
        return self.tape.active(x)


class Node:
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
def sum_terms(terms: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The sum of the non-zero ``terms`` (``None`` if all are zero)."""
    total: torch.Tensor | None = None
    for x in terms:
        if x is not None:
            total = x if total is None else total + x
    return total


def fit_to(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``x`` broadcast to the shape and dtype of the primal output ``like``."""
    if x is None:
        return None
    if x.dtype != like.dtype:
        x = x.to(like.dtype)
    if x.shape != like.shape:
        x = x.expand(like.shape)
    return x


def scaled(a: torch.Tensor | None, s: Any) -> torch.Tensor | None:
    """``a * s`` (``None`` stays zero)."""
    return None if a is None else a * s


def convolve(op: Callable[[Any, Any], torch.Tensor], a: Any, b: Any, k: int, C: Coef
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
    return sum_terms(terms)


def chain_rule(a: Any, series: list[Any], k: int, C: Coef, scale: Any = 1.0) -> torch.Tensor | None:
    """``(1/k) sum_{j=1..k} j * scale * a_j * series_{k-j}``: coefficient ``k`` of ``c`` where
    ``c' = series * scale * a'``."""
    terms = []
    for j in range(1, k + 1):
        aj = C(a, j)
        if aj is not None and series[k - j] is not None:
            terms.append((j * aj) * series[k - j])
    total = sum_terms(terms)
    if total is None:
        return None
    if isinstance(scale, (int, float)) and scale == 1:
        return total / k
    return total * (scale / k)


def self_product(c: list[Any], m: int) -> torch.Tensor | None:
    """Coefficient ``m`` of ``c * c``."""
    return sum_terms([c[i] * c[m - i] for i in range(m + 1)
                      if c[i] is not None and c[m - i] is not None])


def node_arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` (keyword ``name``) of the recorded call, or ``default``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)

