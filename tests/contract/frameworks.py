"""The only framework-specific code of the contract suite: numpy float64 arrays into a backend's
framework and back, the same small vector field in numpy, torch and JAX, and gradients.

A backend declares its framework (``Backend.framework``); :func:`helper` returns the helper for
it, or ``None`` where there is none (the conftest then skips that backend, saying why). Torch and
JAX are imported on first use only.

The vector field is a fixed time-dependent MLP, float64::

    f(t, y) = tanh([y, t] @ W1 + b1) @ W2 + b2        y: (batch, dim), t: scalar

with parameters given as numpy arrays (:func:`mlp_params`), identical in every framework.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

PARAM_NAMES = ("W1", "b1", "W2", "b2")


def mlp_params(dim: int = 3, hidden: int = 8, seed: int = 0, scale: float = 1.2
               ) -> dict[str, np.ndarray]:
    """Fixed parameters of the MLP (float64)."""
    rng = np.random.default_rng(seed)
    shapes = {"W1": (dim + 1, hidden), "b1": (hidden,), "W2": (hidden, dim), "b2": (dim,)}
    return {k: scale * rng.standard_normal(s) / np.sqrt(s[0]) for k, s in shapes.items()}


def np_field(params: dict[str, np.ndarray]) -> Callable[[float, np.ndarray], np.ndarray]:
    """The MLP in numpy (the independent reference)."""
    W1, b1, W2, b2 = (np.asarray(params[k], dtype=np.float64) for k in PARAM_NAMES)

    def f(t: float, y: np.ndarray) -> np.ndarray:
        tt = np.full((*y.shape[:-1], 1), float(t))
        return np.tanh(np.concatenate([y, tt], axis=-1) @ W1 + b1) @ W2 + b2

    return f


class Torch:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def asarray(self, x: Any) -> Any:
        """numpy (or a number) -> float64 tensor; tensors pass through unchanged."""
        if isinstance(x, self.torch.Tensor):
            return x
        return self.torch.as_tensor(np.asarray(x, dtype=np.float64))

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, self.torch.Tensor):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    def field(self, params: dict[str, Any]) -> Callable[[Any, Any], Any]:
        torch = self.torch
        W1, b1, W2, b2 = (params[k] for k in PARAM_NAMES)

        def f(t: Any, y: Any) -> Any:
            # a scalar time, or one per sample on backends whose samples step apart (torchode)
            tt = torch.as_tensor(t, dtype=y.dtype)
            tt = tt.reshape(-1, 1) if tt.ndim == 1 else tt.reshape(1, 1)
            tt = tt.expand(*y.shape[:-1], 1)
            return torch.tanh(torch.cat([y, tt], dim=-1) @ W1 + b1) @ W2 + b2

        return f

    def value_and_grad(self, fn: Callable[..., tuple[Any, Any]], args: Sequence[np.ndarray]
                       ) -> tuple[float, Any, list[np.ndarray]]:
        """``fn(*args)`` returns ``(scalar, aux)``; the scalar's value, ``aux`` and the gradient
        w.r.t. each argument (numpy; zeros where it does not depend on one)."""
        torch = self.torch
        xs = [self.asarray(a).requires_grad_(True) for a in args]
        value, aux = fn(*xs)
        grads = torch.autograd.grad(value, xs, allow_unused=True)
        out = [np.zeros(np.shape(a)) if g is None else g.detach().numpy()
               for a, g in zip(args, grads, strict=True)]
        return float(value.detach()), aux, out


class Jax:
    name = "jax"

    def __init__(self) -> None:
        import equinox as eqx
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        self.jax, self.jnp = jax, jnp

        class MLP(eqx.Module):
            """A pytree, so that compiled solves are reused across parameter values."""

            W1: jax.Array
            b1: jax.Array
            W2: jax.Array
            b2: jax.Array

            def __call__(self, t: Any, y: Any) -> Any:
                tt = jnp.broadcast_to(jnp.asarray(t, dtype=y.dtype), (*y.shape[:-1], 1))
                return jnp.tanh(jnp.concatenate([y, tt], axis=-1) @ self.W1 + self.b1
                                ) @ self.W2 + self.b2

        self.MLP = MLP

    def asarray(self, x: Any) -> Any:
        """numpy (or a number) -> float64 array; JAX arrays (and tracers) pass through."""
        if isinstance(x, self.jax.Array):
            return x
        return self.jnp.asarray(np.asarray(x, dtype=np.float64))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def field(self, params: dict[str, Any]) -> Callable[[Any, Any], Any]:
        return self.MLP(*(params[k] for k in PARAM_NAMES))

    def value_and_grad(self, fn: Callable[..., tuple[Any, Any]], args: Sequence[np.ndarray]
                       ) -> tuple[float, Any, list[np.ndarray]]:
        xs = [self.asarray(a) for a in args]
        (value, aux), grads = self.jax.value_and_grad(
            fn, argnums=tuple(range(len(xs))), has_aux=True)(*xs)
        return float(value), aux, [np.asarray(g) for g in grads]


HELPERS: dict[str, type] = {"torch": Torch, "jax": Jax}
MODULES = {"torch": "torch", "jax": "jax"}
_MADE: dict[str, Any] = {}


def helper(framework: str) -> Torch | Jax | None:
    """The helper for ``framework``, or ``None`` if there is none (or it is not installed)."""
    if framework not in HELPERS or importlib.util.find_spec(MODULES[framework]) is None:
        return None
    if framework not in _MADE:
        _MADE[framework] = HELPERS[framework]()
    return _MADE[framework]


def setup() -> None:
    """Global settings every framework needs before arrays exist (JAX: float64)."""
    if importlib.util.find_spec("jax") is not None:
        import jax

        jax.config.update("jax_enable_x64", True)
