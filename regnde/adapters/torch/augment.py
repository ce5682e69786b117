"""Integral regularizers on torch: the :class:`regnde.backend.Point` of torch backends and the
augmented vector field ``(y, r) -> (f(t, y), sign * [g_1, ..., g_m])``.

Used by the torchdiffeq adapter; nothing here depends on torchdiffeq.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from regnde.adapters.torch.taylor import jvp_derivatives, taylor_derivatives

CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")
#: How :meth:`TorchPoint.derivatives` computes each ``mode``.
DERIVATIVES = {"taylor": taylor_derivatives, "jvp": jvp_derivatives}


class TorchPoint:
    """:class:`regnde.backend.Point` at ``(t, y)`` on torch; computes what is asked once.

    Args:
        f: the user's vector field ``f(t, y)``. t: 0-d time. y: state (``y0.shape``).
        needs_vjp: prepare ``y`` for :meth:`vjp` (a leaf that requires grad when ``y`` has no
            graph; grad enabled locally under ``torch.no_grad``, e.g. in the adjoint's forward).
    """

    def __init__(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 t: torch.Tensor, y: torch.Tensor, needs_vjp: bool = False):
        self.fn, self.t, self.y = f, t, y
        self.graph = torch.is_grad_enabled()
        self.needs_vjp = needs_vjp
        self._y = y
        if needs_vjp and not y.requires_grad:
            self._y = y.detach().requires_grad_()
        self._f: torch.Tensor | None = None
        self._derivs: dict[str, list[torch.Tensor]] = {}

    def _grad_ctx(self) -> Any:
        return torch.enable_grad() if self.needs_vjp else torch.set_grad_enabled(self.graph)

    def f(self) -> torch.Tensor:
        """``f(t, y)``; bit for bit what the plain solve evaluates."""
        if self._f is None:
            with self._grad_ctx():
                self._f = self.fn(self.t, self._y)
        return self._f

    def derivatives(self, order: int, mode: str = "taylor") -> list[torch.Tensor]:
        """``[y', ..., y^(order)]`` (each ``y0.shape``) by Taylor mode or nested jvp."""
        have = self._derivs.get(mode)
        if have is None or len(have) < order:
            derive = DERIVATIVES.get(mode)
            if derive is None:
                raise ValueError(f"derivative mode must be 'taylor' or 'jvp', got {mode!r}.")
            with self._grad_ctx():
                have = derive(self.fn, self.t, self._y, order)
            self._derivs[mode] = have
            if self._f is None and mode == "taylor":
                self._f = have[0]  # the traced call's output is f(t, y) itself
        return have[:order]

    def vjp(self, e: torch.Tensor) -> torch.Tensor:
        """``e^T df/dy`` (``y0.shape``); differentiable when grad is enabled outside."""
        if not self.needs_vjp:
            raise RuntimeError("TorchPoint was not prepared for vjp (needs_vjp=False).")
        fy = self.f()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fy, self._y, e.to(fy.dtype), create_graph=self.graph,
                                       allow_unused=True)
        return torch.zeros_like(self.y) if g is None else g


class AugmentedField(torch.nn.Module):
    """``(t, (y, r)) -> (f(t, y), sign * stack([g(point) for g in integrands]))``.

    ``f`` becomes a submodule when it is an ``nn.Module`` (so ``odeint_adjoint`` finds its
    parameters). ``n_evals`` counts evaluations made outside a backward pass (the forward solve's
    integrand evaluations: ``stats.nfe_reg``).

    Args:
        f: the user's field. integrands: :class:`regnde.regularizers.Integrand` objects.
        sign: ``sign(t1 - t0)``, so that ``r(t1)`` integrates with ``|dt|``.
    """

    def __init__(self, f: Any, integrands: Sequence[Any], sign: float):
        super().__init__()
        self.f = f
        self.integrands = list(integrands)
        self.sign = sign
        self.uses = frozenset().union(*(it.uses for it in self.integrands))
        self.orders: dict[str, int] = {}
        for it in self.integrands:
            if it.order:
                self.orders[it.mode] = max(self.orders.get(it.mode, 0), it.order)
        self.n_evals = 0
        for name in CALLBACKS:  # forward the user's torchdiffeq callbacks with y only
            cb = getattr(f, name, None)
            if cb is not None:
                object.__setattr__(self, name, _on_y(cb))

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        y = state[0]
        graph = torch.is_grad_enabled()
        point = TorchPoint(self.f, t, y, needs_vjp="vjp" in self.uses)
        for mode, order in self.orders.items():
            point.derivatives(order, mode)
        dy = point.f()
        values = [it.fn(point).reshape(()).to(y.dtype) for it in self.integrands]
        dr = torch.stack(values) * self.sign
        if torch._C._current_autograd_node() is None:
            self.n_evals += 1
        if not graph:
            dy, dr = dy.detach(), dr.detach()
        return dy, dr


def _on_y(cb: Callable[..., Any]) -> Callable[..., Any]:
    def callback(t0: Any, state: Any, dt: Any) -> Any:
        return cb(t0, state[0], dt)
    return callback
