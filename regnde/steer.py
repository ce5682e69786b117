"""STEER (Ghosh, Behl et al. 2020): a random end time per training step.

``T ~ U(t1 - b, t1 + b)`` replaces the last output time; drawn from the solve's ``key`` (a key
derived from it, so the regularizer's own draws do not change), a constant for autodiff.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

from regnde.validate import is_concrete

#: ``key.fold(STEER_FOLD)`` draws the end time (regularizer terms use ``key`` or small folds).
STEER_FOLD = 0x57EE


def check_steer(t: Any, b: Any) -> None:
    """Raise ``ValueError`` unless ``0 < b < |t[-1] - t[-2]|`` (``|t1 - t0|`` for two times)."""
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
        raise ValueError(f"STEER needs a half-width b > 0 (a finite number), got b={b!r}.")
    if not is_concrete(t):
        return  # under jax.jit: the caller vouches for b
    last = abs(float(t[-1] - t[-2]))
    if b >= last:
        what = "t1 - t0" if t.shape[0] == 2 else "the last interval |t[-1] - t[-2]|"
        raise ValueError(
            f"STEER needs b < {what} = {last:g} so that the drawn end time stays beyond "
            f"t[-2] (the time grid stays monotonic), got b={b!r}. Use a smaller b "
            f"(the STEER paper uses b < t1 - t0)."
        )


def steer_times(t: Any, b: float, key: Any) -> Any:
    """``t`` with its last entry replaced by ``t[-1] + b * (2u - 1)``, ``u = key.uniform``.

    Args:
        t: ``(T,)`` output times (increasing or decreasing). b: half-width, ``0 < b`` and
            ``b < |t[-1] - t[-2]|``. key: a backend :class:`regnde.backend.Key`.

    Returns:
        ``(T,)`` times of ``t``'s array type; not differentiable in ``b`` or the draw.
    """
    check_steer(t, b)
    xp = array_namespace(t)
    u = key.fold(STEER_FOLD).uniform(t[-1])
    end = t[-1] + b * (2 * u - 1)
    return xp.concat([t[:-1], xp.reshape(end, (1,))])


def steer(t: Any, b: float, key: Any = None, backend: str | None = None) -> Any:
    """STEER's random end time: ``t`` with ``t[-1]`` replaced by ``T ~ U(t1 - b, t1 + b)``.

    Same as ``regnde.solve(..., steer=b, key=key)`` does with its ``t``; call it once per
    training step (a new ``key`` each step) and pass the result as ``t``.

    Args:
        t: ``(T,)`` output times, a torch tensor or JAX array.
        b: half-width of the window, ``0 < b < |t[-1] - t[-2]|`` (``t1 - t0`` for two times);
            anything else raises ``ValueError``.
        key: int seed, ``torch.Generator``, JAX PRNG key or ``None`` (as for ``solve``): same
            key, same end time.
        backend: the backend whose keys to use; ``None`` infers it from ``t``.

    Returns:
        The new ``(T,)`` time grid.
    """
    from regnde.api import default_backend
    from regnde.plugins.manager import registry

    name = backend or default_backend(t, label="t")
    return steer_times(t, b, registry().backend(name).make_key(key))
