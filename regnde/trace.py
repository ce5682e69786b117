"""Backend-neutral records of a solve: :class:`Trace`, :class:`StepResult`, :class:`Stats`,
:class:`Solution`.

All array fields are arrays of the backend (torch tensors or JAX arrays); nothing here imports
either framework.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

Array = Any  # an array of the backend's framework


@dataclass(frozen=True)
class Trace:
    """The accepted steps of a solve, in solve order.

    Shapes: ``N`` accepted steps in eager mode; under ``jax.jit`` ``N`` is a fixed capacity and
    ``mask`` marks the real entries.

    Per-sample form (backends whose samples step independently, torchode): every per-step
    field has a leading batch axis, ``(batch, N)`` (``y``: ``(batch, N, *y0.shape[1:])``), ``N``
    the most steps any sample took, ``mask[b]`` marking sample ``b``'s own steps and
    ``n_steps`` a ``(batch,)`` tensor. Regularizers reduce each sample's steps and take the
    mean over samples; samplers return one ``tau`` per sample (or one for all), and
    :meth:`regnde.backend.Run.step` takes per-sample ``tau``/``dt`` and returns per-sample
    errors.

    Attributes:
        t: ``(N,)`` start time of each step.
        dt: ``(N,)`` signed step length, the last one clipped to the end time; constant.
        mask: ``(N,)`` bool, ``True`` for real entries.
        n_steps: number of real entries (int, or a scalar array under jit).
        error: ``(N,)`` scaled error the controller compares with 1; differentiable with
            ``sensitivity="direct"``.
        stiffness: ``(N,)`` Shampine's stiffness estimate, or ``None`` without a stiffness pair.
        y: ``(N, *y0.shape)`` state at the start of each step, or ``None`` with
            ``trace="summary"``.
        dt_taken: ``(N,)`` signed step length as the solver took it (differs from ``dt`` only
            where a backend's last step overshoots ``t1``; ``error`` belongs to this step), so
            a fixed-grid replay can reproduce every recorded error. ``None`` means ``dt``.
    """

    t: Array
    dt: Array
    mask: Array
    n_steps: Any
    error: Array
    stiffness: Array | None = None
    y: Array | None = None
    dt_taken: Array | None = None

    def summary(self) -> Trace:
        """The same trace without states."""
        return replace(self, y=None)


@dataclass(frozen=True)
class StepResult:
    """One step of a method from ``(t, y)``: see :func:`regnde.step`.

    Attributes:
        t: start time; ``dt``: signed step size; ``y1``: state at ``t + dt``.
        error: scaled error estimate (scalar; ``(batch,)`` on backends whose samples step
            independently), differentiable w.r.t. ``y`` and parameters.
        stiffness: Shampine's estimate (scalar, or ``(batch,)`` like ``error``) or ``None``.
        stages: ``(stages, *y.shape)`` stage derivatives ``k_i = f(t + c_i dt, Y_i)``.
    """

    t: Array
    dt: Array
    y1: Array
    error: Array
    stiffness: Array | None
    stages: Array


@dataclass
class Stats:
    """Counts of one solve.

    Attributes:
        nfe: vector-field evaluations of the forward solve, rejected steps included.
        nfe_reg: evaluations spent by the regularizer on top (local steps, augmented states).
        n_steps: accepted steps. n_rejected: rejected steps.
    """

    nfe: Any = 0
    nfe_reg: Any = 0
    n_steps: Any = 0
    n_rejected: Any = 0


@dataclass
class Solution:
    """What :func:`regnde.solve` returns.

    Attributes:
        ys: ``(len(t), *y0.shape)`` states at the output times.
        reg: the regularizer's differentiable scalar, or ``None``.
        stats: :class:`Stats`.
        trace: :class:`Trace` of the accepted steps.
    """

    ys: Array
    reg: Array | None
    stats: Stats = field(default_factory=Stats)
    trace: Trace | None = None
