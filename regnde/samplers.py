"""Where a local regularizer takes its extra step: samplers of ``tau``.

A sampler's ``sample(trace, t0, t1, key)`` returns ``tau``, a scalar of the backend (for a
per-sample trace, :class:`regnde.Trace`, a scalar or one ``tau`` per sample). Samplers use
array-API operations only (no Python loop over steps, no branch on array values), so the same
code runs eagerly on torch and compiled on JAX.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from array_api_compat import array_namespace

from regnde.plugins.hookspecs import hookimpl
from regnde.structural import Structural
from regnde.trace import Array, Trace


def as_key(key: Any, like: Array) -> Any:
    """``key`` as a :class:`regnde.backend.Key`: a Key is returned as is; any other form
    ``regnde.solve(key=...)`` takes (int seed, generator, PRNG key, ``None``) is converted by
    the registered backend that owns ``like``'s arrays."""
    if hasattr(key, "uniform") and hasattr(key, "fold"):
        return key
    from regnde.plugins.manager import registry

    reg = registry()
    for name in reg.names("backend"):
        try:
            backend = reg.backend(name)
        except Exception:  # a broken plugin owns nothing
            continue
        if backend.owns(like):
            return backend.make_key(key)
    raise ValueError(
        f"cannot make a sampling key from {key!r} for arrays of type "
        f"{type(like).__module__}.{type(like).__name__}: no registered backend takes them. "
        f"Pass t0/t1 as arrays of an installed backend (torch tensors, JAX arrays)."
    )


class Sampler(Structural, ABC):
    """Base class. ``needs_trace = False`` lets regnde draw ``tau`` before the solve, so the
    solver records ``u(tau)`` from its own dense output at no extra cost.

    ``sample``'s ``key`` takes every form ``regnde.solve(key=...)`` takes: a subclass's
    ``sample`` always receives a :class:`regnde.backend.Key` (converted by :func:`as_key`)."""

    name: ClassVar[str]
    needs_trace: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inner = cls.__dict__.get("sample")
        if inner is None or getattr(inner, "_regnde_keyed", False):
            return

        @functools.wraps(inner)
        def sample(self: Sampler, trace: Trace | None, t0: Array, t1: Array, key: Any) -> Array:
            return inner(self, trace, t0, t1, as_key(key, t0))

        sample._regnde_keyed = True  # type: ignore[attr-defined]
        cls.sample = sample  # type: ignore[method-assign]

    @abstractmethod
    def sample(self, trace: Trace | None, t0: Array, t1: Array, key: Any) -> Array:
        """``tau`` in ``[t0, t1]`` (either direction), a scalar of the backend."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Unbiased(Sampler):
    """``tau ~ U[t0, t1]``: an unbiased estimate of the time-average of the error."""

    name = "unbiased"
    needs_trace = False

    def sample(self, trace: Trace | None, t0: Array, t1: Array, key: Any) -> Array:
        u = key.uniform(t0)
        return t0 + u * (t1 - t0)


class Biased(Sampler):
    """``tau`` uniform over the accepted step starts ``trace.t`` (never ``t1``): samples
    concentrate where the solver steps densely.

    On a per-sample trace (``(batch, N)``) it returns one ``tau`` per sample: the same uniform
    draw picks the step of each sample, so each sample's ``tau`` is uniform over its own steps."""

    name = "biased"
    needs_trace = True

    def sample(self, trace: Trace | None, t0: Array, t1: Array, key: Any) -> Array:
        if trace is None:
            raise ValueError("the biased sampler needs the solve's trace of step times.")
        xp = array_namespace(trace.t)
        u = key.uniform(trace.t[0])
        axis = -1 if trace.t.ndim == 2 else None  # per-sample traces: one index per sample
        n = xp.sum(xp.astype(trace.mask, index_dtype(xp)), axis=axis)
        index = xp.astype(xp.floor(u * xp.astype(n, u.dtype)), index_dtype(xp))
        index = xp.clip(index, 0, n - 1)
        return take(trace.t, index)


def index_dtype(xp: Any) -> Any:
    """The library's default integer dtype (int64 on torch; int32 on JAX without x64, where
    asking for int64 only warns and gives int32)."""
    return xp.asarray(0).dtype


def take(x: Array, index: Array) -> Array:
    """``x[index]`` for a scalar integer array ``index``, on any array library; for a
    per-sample ``x`` of shape ``(batch, N)``, ``x[b, index[b]]`` for each sample ``b``."""
    xp = array_namespace(x)
    if x.ndim == 2:
        return xp.take_along_axis(x, xp.reshape(index, (-1, 1)), axis=-1)[:, 0]
    return xp.take(x, xp.reshape(index, (1,)), axis=0)[0]


@hookimpl
def regnde_register_samplers(register: Callable[[str, type], None]) -> None:
    register(Unbiased.name, Unbiased)
    register(Biased.name, Biased)
