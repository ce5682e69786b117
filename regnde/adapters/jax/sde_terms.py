"""The terms of an SDE on the diffrax backend: the diffusion as a linear operator on Brownian
increments (diagonal noise: ``lineax.DiagonalLinearOperator``; general, additive and scalar
noise: :class:`NoiseMatrix`, ``einsum("...dm,...m->...d")``), the ``MultiTerm`` of drift and
diffusion, the Brownian motion's shape (checked against the diffusion) and the
``VirtualBrownianTree`` seeded from regnde's key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from regnde.adapters.jax.common import JaxKey, _VectorField

#: ``VirtualBrownianTree`` tolerance relative to ``|t1 - t0|`` when ``bm_tol`` is not given.
DEFAULT_BM_TOL = 1e-5
#: The key stream that seeds the Brownian motion (as on torchsde): ``fold_in(key, 0x5DE)``.
BROWNIAN_STREAM = 0x5DE


class NoiseMatrix(lx.AbstractLinearOperator):
    """``g`` of shape ``(..., d, m)`` acting on Brownian increments ``(..., m)``."""

    matrix: jax.Array

    def mv(self, vector: Any) -> Any:
        return jnp.einsum("...dm,...m->...d", self.matrix, vector)

    def as_matrix(self) -> Any:
        raise NotImplementedError("regnde's NoiseMatrix has no dense matrix form.")

    def transpose(self) -> Any:
        raise NotImplementedError("regnde's NoiseMatrix has no transpose.")

    def in_structure(self) -> Any:
        s = self.matrix.shape
        return jax.ShapeDtypeStruct((*s[:-2], s[-1]), self.matrix.dtype)

    def out_structure(self) -> Any:
        return jax.ShapeDtypeStruct(self.matrix.shape[:-1], self.matrix.dtype)


for _prop in (lx.is_symmetric, lx.is_positive_semidefinite, lx.is_negative_semidefinite):
    _prop.register(NoiseMatrix)(lambda operator: False)  # lineax's __check_init__ asks


class _Diffusion(eqx.Module):
    g: Callable[..., Any]
    diagonal: bool = eqx.field(static=True)

    def __call__(self, t: Any, y: Any, args: Any) -> Any:
        g = self.g(t, y)
        return lx.DiagonalLinearOperator(g) if self.diagonal else NoiseMatrix(g)


def make_terms(drift: Callable[..., Any], diffusion: Callable[..., Any], noise_type: str,
               bm: Any) -> dfx.MultiTerm:
    """``MultiTerm(ODETerm(drift), ControlTerm(diffusion, bm))`` for regnde's ``f(t, y)``,
    ``g(t, y)``."""
    return dfx.MultiTerm(dfx.ODETerm(_VectorField(drift)),
                         dfx.ControlTerm(_Diffusion(diffusion, noise_type == "diagonal"), bm))


def brownian_shape(sde: Any, t0: Any, y0: jax.Array) -> tuple[int, ...]:
    """The Brownian motion's shape; checks the diffusion's shape (no evaluation)."""
    noise = sde.noise_type
    try:
        g = jax.eval_shape(sde.g, t0, y0)
    except Exception as exc:
        raise ValueError(
            f"calling the diffusion g(t, y) with y of shape {tuple(y0.shape)} failed: "
            f"{type(exc).__name__}: {exc}. g must take (t, y)."
        ) from exc
    shape = tuple(getattr(g, "shape", ()))
    if getattr(g, "dtype", None) != y0.dtype:
        raise ValueError(f"the diffusion g(t, y) must return an array of y0's dtype {y0.dtype}, "
                         f"got {getattr(g, 'dtype', type(g))}.")
    y = tuple(y0.shape)
    if noise == "diagonal":
        if shape != y:
            raise ValueError(
                f"the diffusion g(t, y) of an SDE with diagonal noise must have the shape of y, "
                f"{y}; got {shape}. Return one entry per state, or set noise_type='general' "
                f"for a (..., d, m) diffusion matrix."
            )
        return y
    m_hint = "1" if noise == "scalar" else "m"
    if (len(y) < 1 or len(shape) != len(y) + 1 or shape[:-1] != y
            or (noise == "scalar" and shape[-1] != 1)):
        raise ValueError(
            f"the diffusion g(t, y) of an SDE with {noise} noise must have shape "
            f"(..., d, {m_hint}) = {(*y, m_hint)}; got {shape}. For one noise channel per state "
            f"use noise_type='diagonal' and g of y's shape."
        )
    return (*y[:-1], shape[-1])


def brownian_tree(key: JaxKey, t0: Any, t1: Any, tol: Any, shape: tuple[int, ...],
                  dtype: Any) -> dfx.VirtualBrownianTree:
    """The Brownian motion for ``key``: a ``VirtualBrownianTree`` over ``[t0, t1]`` whose key
    is ``jax.random.fold_in(key, BROWNIAN_STREAM)``."""
    k = jax.random.fold_in(key._key(), BROWNIAN_STREAM)
    return dfx.VirtualBrownianTree(t0, t1, tol, jax.ShapeDtypeStruct(shape, dtype), k)


def check_bm(bm: Any, shape: tuple[int, ...]) -> None:
    """Checks a user's Brownian path ``bm`` (``None``: regnde makes one) against ``shape``."""
    if bm is None:
        return
    if not isinstance(bm, dfx.AbstractBrownianPath):
        raise ValueError(f"bm must be a diffrax Brownian path (VirtualBrownianTree), got "
                         f"{type(bm).__name__}.")
    got = tuple(getattr(getattr(bm, "shape", None), "shape", ()))
    if got != shape:
        raise ValueError(f"bm has shape {got}, the diffusion needs Brownian motion of shape "
                         f"{shape}.")
