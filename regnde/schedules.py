"""Coefficient schedules for regularization strength: ``lam = schedule(iteration)``.

The references decay (or grow) the coefficient exponentially from ``l0`` to ``l1`` over ``n``
iterations, ``l0 * exp(-k i)`` with ``k = log(l0 / l1) / n`` (2.5 -> 1.0 for MNIST, 100 -> 10 for
PhysioNet, 0.1 -> 5.0 increasing for multiscale CIFAR10). Past ``n`` a schedule stays at ``l1``.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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


class NFEBudget:
    """A coefficient chosen online so that training settles at a target cost.

    After each iteration call :meth:`update` with the measured NFE of the regularized solves
    (``sol.stats.nfe``, or ``reg.stats.nfe`` of a drop-in block); ``budget(i)`` (or
    :attr:`value`) is the coefficient to use next. The controller is a PI controller on the
    logarithm of an exponentially smoothed NFE, acting on ``log lam``::

        m_k  = beta * m_{k-1} + (1 - beta) * log(nfe_k)           (smoothed log NFE)
        e_k  = m_k - log(target)                                  (> 0: too expensive)
        I_k  = clip(I_{k-1} + e_k, -windup, windup)
        lam  = lam0 * exp(kp * e_k + ki * I_k)                    (0 while below lam_min)

    so ``lam`` grows geometrically while the model is too expensive, decays toward 0 below the
    target, and is never negative. See docs/budget.md for the equations' defaults and failure
    modes.

    Args:
        target_nfe: the NFE to settle at (evaluations of the forward solve per iteration).
        target_ratio: instead, a fraction of the NFE measured over the first ``warmup``
            iterations (``0.6`` for 60 %); ``lam`` stays 0 during warm-up.
        lam0: the coefficient when the NFE is on target with no accumulated error.
        kp, ki: proportional and integral gains (per unit of log NFE).
        beta: smoothing of the measured NFE (0: none; 0.9: about 10 iterations).
        windup: bound on the integral term (anti-windup), in units of log NFE.
        lam_max, lam_min: ``lam`` is clipped to ``lam_max``; below ``lam_min`` it is 0.
        warmup: iterations measured for ``target_ratio``.
        reduce: a function that averages a float across data-parallel ranks, so that all
            ranks use the same ``lam``: :func:`regnde.distributed.mean_across_ranks` (torch
            DDP, multi-host JAX); ``None`` on a single process or where the caller feeds an
            NFE that is already averaged.
        floor_nfe: the least NFE the method can reach (e.g. :func:`floor_nfe`); a target below
            it warns once and the controller aims at the floor instead.
        patience: updates with ``lam`` pinned at ``lam_max`` while the NFE stays above target
            after which the budget warns (once) that the regularizer cannot lower this solve's
            NFE (a fixed-step method, a regularizer the step count does not depend on).
    """

    def __init__(self, target_nfe: float | None = None, *, target_ratio: float | None = None,
                 lam0: float = 0.1, kp: float = 1.0, ki: float = 0.2, beta: float = 0.7,
                 windup: float = 100.0, lam_max: float = 1e4, lam_min: float = 1e-4,
                 warmup: int = 5, reduce: Callable[[float], float] | None = None,
                 floor_nfe: float | None = None, patience: int = 20):
        if (target_nfe is None) == (target_ratio is None):
            raise ValueError(
                "NFEBudget needs exactly one of target_nfe (an absolute number of function "
                "evaluations, e.g. 40) or target_ratio (a fraction of the starting NFE, e.g. "
                f"0.6); got target_nfe={target_nfe!r}, target_ratio={target_ratio!r}."
            )
        if target_nfe is not None:
            _positive("target_nfe", target_nfe)
        if target_ratio is not None:
            _positive("target_ratio", target_ratio)
            if target_ratio >= 1:
                warnings.warn(
                    f"NFEBudget(target_ratio={target_ratio}) asks for at least the starting "
                    f"NFE: the regularizer will only act if the NFE grows past it. Use a "
                    f"ratio below 1 (0.5-0.7 is typical) to make solves cheaper.",
                    UserWarning, stacklevel=2)
        for name, v in (("lam0", lam0), ("kp", kp), ("lam_max", lam_max), ("windup", windup)):
            _positive(name, v)
        for name, v in (("ki", ki), ("lam_min", lam_min)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"NFEBudget: {name} must be a finite number >= 0, got {v!r}.")
        if not 0 <= beta < 1:
            raise ValueError(f"NFEBudget: beta (smoothing) must be in [0, 1), got {beta!r}.")
        for name, n in (("warmup", warmup), ("patience", patience)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"NFEBudget: {name} must be a positive int, got {n!r}.")
        if floor_nfe is not None:
            _positive("floor_nfe", floor_nfe)
        self.target_nfe, self.target_ratio = target_nfe, target_ratio
        self.lam0, self.kp, self.ki, self.beta = lam0, kp, ki, beta
        self.windup, self.lam_max, self.lam_min = windup, lam_max, lam_min
        self.warmup, self.reduce, self.floor_nfe = warmup, reduce, floor_nfe
        self.patience, self.pinned = patience, 0  # updates in a row at lam_max, above target
        self.value = 0.0 if target_ratio is not None else lam0
        self.smoothed: float | None = None  # m_k, smoothed log NFE
        self.integral = 0.0
        self.start: list[float] = []  # NFE of the warm-up iterations (target_ratio)
        self.history: list[tuple[float, float]] = []  # (nfe, lam) per update
        self._warned = False
        if target_nfe is not None:
            self._check_floor(float(target_nfe))

    # -- the schedule interface --------------------------------------------------------------
    def __call__(self, iteration: int) -> float:
        """The coefficient to use now (``iteration`` is accepted for the schedule interface)."""
        _check_iteration(iteration)
        return self.value

    @property
    def target(self) -> float | None:
        """The NFE aimed at (``None`` until the warm-up of ``target_ratio`` is over)."""
        if self.target_nfe is not None:
            t = float(self.target_nfe)
        elif len(self.start) >= self.warmup:
            t = float(self.target_ratio) * statistics.median(self.start)  # type: ignore[arg-type]
        else:
            return None
        return max(t, self.floor_nfe) if self.floor_nfe is not None else t

    def update(self, nfe: float) -> float:
        """Feed the NFE measured at the iteration just done; returns the next coefficient."""
        nfe = float(nfe)
        if self.reduce is not None:
            nfe = float(self.reduce(nfe))
        if not (math.isfinite(nfe) and nfe > 0):
            raise ValueError(f"NFEBudget.update needs the measured NFE (> 0), got {nfe!r}; "
                             f"pass sol.stats.nfe of the regularized solve.")
        if self.target_ratio is not None and len(self.start) < self.warmup:
            self.start.append(nfe)
            if len(self.start) == self.warmup:
                self._check_floor(self.target)  # type: ignore[arg-type]
        target = self.target
        log_nfe = math.log(nfe)
        self.smoothed = log_nfe if self.smoothed is None else (
            self.beta * self.smoothed + (1 - self.beta) * log_nfe)
        if target is not None:
            e = self.smoothed - math.log(target)
            integral = min(max(self.integral + e, -self.windup), self.windup)
            lam = self.lam0 * math.exp(min(self.kp * e + self.ki * integral, 700.0))
            # conditional integration (anti-windup): no integrating further into a bound that
            # lam already sits at -- below lam_min while cheap, at lam_max while expensive
            if not ((lam < self.lam_min and e < 0) or (lam > self.lam_max and e > 0)):
                self.integral = integral
            self.value = 0.0 if lam < self.lam_min else min(lam, self.lam_max)
            self.pinned = self.pinned + 1 if (lam >= self.lam_max and e > 0) else 0
            if self.pinned == self.patience:
                warnings.warn(
                    f"NFEBudget: lam has been at lam_max={self.lam_max:g} for {self.patience} "
                    f"updates while the NFE ({nfe:g}) stays above the target ({target:g}): the "
                    f"regularizer cannot lower this solve's NFE (a fixed-step method, or a "
                    f"regularizer the number of steps does not depend on). Use an adaptive "
                    f"method with an error regularizer (LocalError, GlobalError), or raise the "
                    f"target.", UserWarning, stacklevel=2)
        self.history.append((nfe, self.value))
        return self.value

    def _check_floor(self, target: float) -> None:
        if self.floor_nfe is not None and target < self.floor_nfe and not self._warned:
            self._warned = True
            warnings.warn(
                f"NFEBudget: the target of {target:g} evaluations is below the least this "
                f"method can take ({self.floor_nfe:g}: one step); training aims at the floor "
                f"instead. Raise the target, or use a method with fewer stages.",
                UserWarning, stacklevel=3)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to resume exactly (plain Python values)."""
        return {"value": self.value, "smoothed": self.smoothed, "integral": self.integral,
                "start": list(self.start), "history": [list(h) for h in self.history],
                "pinned": self.pinned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.smoothed = None if state["smoothed"] is None else float(state["smoothed"])
        self.integral = float(state["integral"])
        self.start = [float(x) for x in state["start"]]
        self.history = [(float(a), float(b)) for a, b in state["history"]]
        self.pinned = int(state.get("pinned", 0))

    def __repr__(self) -> str:
        goal = (f"target_nfe={self.target_nfe}" if self.target_nfe is not None
                else f"target_ratio={self.target_ratio}")
        return f"NFEBudget({goal}, lam={self.value:.4g})"


def floor_nfe(tableau: Any, initial_selection: int = 2) -> int:
    """The least NFE an adaptive solve with ``tableau`` can take: the initial step selection's
    evaluations plus one step's stages (a FSAL tableau's last stage is the next step's first,
    so it is counted once)."""
    return int(initial_selection) + int(tableau.stages)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"NFEBudget: {name} must be a finite number > 0, got {value!r}.")
