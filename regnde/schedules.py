"""Coefficient schedules for regularization strength: ``lam = schedule(iteration)``.

The references decay (or grow) the coefficient exponentially from ``l0`` to ``l1`` over ``n``
iterations, ``l0 * exp(-k i)`` with ``k = log(l0 / l1) / n`` (2.5 -> 1.0 for MNIST, 100 -> 10 for
PhysioNet, 0.1 -> 5.0 increasing for multiscale CIFAR10). Past ``n`` a schedule stays at ``l1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}.")


def _check_iteration(i: int) -> int:
    if i < 0:
        raise ValueError(f"iteration must be >= 0, got {i!r}.")
    return i


@dataclass(frozen=True)
class Constant:
    """``lam(i) = value``."""

    value: float

    def __call__(self, iteration: int) -> float:
        _check_iteration(iteration)
        return float(self.value)


@dataclass(frozen=True)
class Exponential:
    """``lam(i) = l0 * (l1 / l0) ** (min(i, steps) / steps)``, either direction."""

    l0: float
    l1: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.l0 > 0 and self.l1 > 0) or not math.isfinite(self.l0 * self.l1):
            raise ValueError(
                f"exponential schedule needs positive finite endpoints, got l0={self.l0!r}, "
                f"l1={self.l1!r}; use Cosine or Constant for a schedule that reaches 0."
            )
        _check_steps(self.steps)

    def __call__(self, iteration: int) -> float:
        x = min(_check_iteration(iteration), self.steps) / self.steps
        return float(self.l0 * math.exp(math.log(self.l1 / self.l0) * x))


@dataclass(frozen=True)
class Cosine:
    """``lam(i) = l1 + (l0 - l1) * (1 + cos(pi * min(i, steps) / steps)) / 2``."""

    l0: float
    l1: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.l0) and math.isfinite(self.l1)):
            raise ValueError(f"cosine schedule needs finite endpoints, got {self.l0}, {self.l1}.")
        _check_steps(self.steps)

    def __call__(self, iteration: int) -> float:
        x = min(_check_iteration(iteration), self.steps) / self.steps
        return float(self.l1 + (self.l0 - self.l1) * 0.5 * (1.0 + math.cos(math.pi * x)))
