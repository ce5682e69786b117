"""The step-doubling step and error of torchsde's adaptive stepping, as regnde takes them.

:func:`double_step` is one full step and two half steps on the solver's Brownian motion;
:func:`scaled_error` the error torchsde's controller computes from them (differentiable), and
:func:`with_error_gradient` the same for many accepted steps at once; :func:`step_result` the
:class:`StepResult` of one such step.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torchsde._core import adaptive_stepping

from regnde.trace import StepResult

#: ``eps`` of ``adaptive_stepping.compute_error`` (the floor of tolerances and of the error).
ERROR_EPS: float = inspect.signature(adaptive_stepping.compute_error).parameters["eps"].default


# -- the step-doubling error, as torchsde's controller computes it ----------------------------
def scaled_error(y_full: torch.Tensor, y_half: torch.Tensor, rtol: Any, atol: Any
                 ) -> torch.Tensor:
    """``adaptive_stepping.compute_error`` (adaptive_stepping.py:42) without ``no_grad``.

    ``y_full``: one full step, ``y_half``: two half steps, both ``(batch, d)``. Returns the
    scalar error the controller compares with 1, differentiable w.r.t. both; ``float`` of it is
    bit-identical to torchsde's value.
    """
    tol = (rtol * torch.max(torch.abs(y_full), torch.abs(y_half)) + atol).clamp_min(ERROR_EPS)
    return adaptive_stepping._rms([(y_full - y_half) / tol], ERROR_EPS)


def with_error_gradient(error: torch.Tensor, y_full: torch.Tensor, y_half: torch.Tensor,
                        rtol: Any, atol: Any) -> torch.Tensor:
    """``error`` (``(N,)``, torchsde's values) with the gradient of :func:`scaled_error` for
    ``N`` steps at once (``y_full``, ``y_half``: ``(N, batch, d)``): one batched graph instead
    of one per step. The values stay bit-identical to the controller's; the batched sum may
    round differently, so only its gradient is used."""
    tol = (rtol * torch.max(torch.abs(y_full), torch.abs(y_half)) + atol).clamp_min(ERROR_EPS)
    x = (y_full - y_half) / tol
    rms = torch.linalg.vector_norm(x.flatten(1), dim=1) / math.sqrt(x[0].numel())
    batched = rms.clamp_min(ERROR_EPS)
    return batched + (error - batched).detach()


def double_step(solver: Any, t0: torch.Tensor, t1: torch.Tensor, y: torch.Tensor,
                extra: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, torch.Tensor]:
    """One adaptive-style step as ``BaseSDESolver.integrate`` takes it (base_solver.py:116).

    Returns ``(y_full, y_mid, y_half, extra_half, error)``: the full step, the first half step,
    the two half steps (the state torchsde accepts), the solver's extra state after them, and
    :func:`scaled_error`. All on the solver's Brownian motion; differentiable w.r.t. ``y`` and
    the SDE's parameters.
    """
    y_full, _ = solver.step(t0, t1, y, extra)
    tm = 0.5 * (t0 + t1)
    y_mid, extra_mid = solver.step(t0, tm, y, extra)
    y_half, extra_half = solver.step(tm, t1, y_mid, extra_mid)
    return y_full, y_mid, y_half, extra_half, scaled_error(y_full, y_half, solver.rtol,
                                                           solver.atol)


def step_result(solver: Any, t0: torch.Tensor, t1: torch.Tensor, y: torch.Tensor
                ) -> StepResult:
    """:func:`double_step` from ``(t0, y)`` to ``t1`` as a :class:`StepResult`: ``y1`` the two
    half steps, ``stages`` the states ``(y_full, y_mid, y_half)``, no stiffness."""
    extra = solver.init_extra_solver_state(t0, y)
    y_full, y_mid, y_half, _, error = double_step(solver, t0, t1, y, extra)
    return StepResult(t=t0, dt=t1 - t0, y1=y_half, error=error, stiffness=None,
                      stages=torch.stack([y_full, y_mid, y_half]))


