"""Where a local regularizer takes its extra step: samplers of ``tau``.

A sampler's ``sample(trace, t0, t1, key)`` returns ``tau``, a scalar of the backend. Samplers use
array-API operations only (no Python loop over steps, no branch on array values), so the same
code runs eagerly on torch and compiled on JAX.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from array_api_compat import array_namespace

from regnde.plugins.hookspecs import hookimpl
from regnde.trace import Array, Trace


class Sampler(ABC):
    """Base class. ``needs_trace = False`` lets regnde draw ``tau`` before the solve, so the
    solver records ``u(tau)`` from its own dense output at no extra cost."""

    name: ClassVar[str]
    needs_trace: ClassVar[bool] = True

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
    concentrate where the solver steps densely."""

    name = "biased"
    needs_trace = True

    def sample(self, trace: Trace | None, t0: Array, t1: Array, key: Any) -> Array:
        if trace is None:
            raise ValueError("the biased sampler needs the solve's trace of step times.")
        xp = array_namespace(trace.t)
        u = key.uniform(trace.t[0])
        n = xp.sum(xp.astype(trace.mask, index_dtype(xp)))
        index = xp.astype(xp.floor(u * xp.astype(n, u.dtype)), index_dtype(xp))
        index = xp.clip(index, 0, n - 1)
        return take(trace.t, index)


def index_dtype(xp: Any) -> Any:
    """The library's default integer dtype (int64 on torch; int32 on JAX without x64, where
    asking for int64 only warns and gives int32)."""
    return xp.asarray(0).dtype


def take(x: Array, index: Array) -> Array:
    """``x[index]`` for a scalar integer array ``index``, on any array library."""
    xp = array_namespace(x)
    return xp.take(x, xp.reshape(index, (1,)), axis=0)[0]


@hookimpl
def regnde_register_samplers(register: Callable[[str, type], None]) -> None:
    register(Unbiased.name, Unbiased)
    register(Biased.name, Biased)
