"""The drop-in for unchanged ``diffrax.diffeqsolve`` code: :class:`Regularized`, a wrapper
solver, and :func:`value` (see :mod:`regnde.adapters.jax.diffrax_dropin`). JAX is imported on first
use, so ``import regnde`` stays cheap."""

from __future__ import annotations

from typing import Any

_PUBLIC = ("Regularized", "value")


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        from regnde.adapters.jax import diffrax_dropin

        return getattr(diffrax_dropin, name)
    raise AttributeError(f"module 'regnde.diffrax' has no attribute {name!r}")
