"""Framework-neutral checks of user input (array-api-compat), shared by every backend."""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

from regnde.backend import SENSITIVITIES, TRACE_MODES
from regnde.errors import choices, non_finite_y0


def framework_of(x: Any) -> str:
    """``"torch"``, ``"jax"``, ``"numpy"`` or the top-level module name of ``x``'s type."""
    root = type(x).__module__.split(".")[0]
    return {"jaxlib": "jax", "builtins": "python"}.get(root, root)


def is_concrete(x: Any) -> bool:
    """False for JAX tracers (values unknown at trace time)."""
    return "Tracer" not in type(x).__name__


def check_options(sensitivity: str, trace: str, max_steps: Any, rtol: Any, atol: Any) -> None:
    if sensitivity not in SENSITIVITIES:
        raise ValueError(choices("sensitivity", sensitivity, SENSITIVITIES))
    if trace not in TRACE_MODES:
        raise ValueError(choices("trace mode", trace, TRACE_MODES))
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    values = [tolerance(name, tol) for name, tol in (("rtol", rtol), ("atol", atol))]
    if values[0] == values[1] == 0:
        raise ValueError("rtol and atol cannot both be 0: the error could never be accepted.")


def tolerance(name: str, tol: Any) -> float | None:
    """The value of a tolerance given as a number or a 0-d tensor/array (``None`` for ``None``
    and for values unknown at trace time); ``ValueError`` unless finite and ``>= 0``."""
    if tol is None or not is_concrete(tol):
        return None
    if isinstance(tol, bool) or not (isinstance(tol, (int, float))
                                     or getattr(tol, "shape", None) in ((), (1,))):
        raise ValueError(f"{name} must be a number (or a 0-d tensor/array), got {tol!r}.")
    value = float(tol)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {tol!r}; typical values "
                         f"are 1e-3 (loose) to 1e-8 (tight).")
    return value


def check_times(t: Any, y0: Any) -> None:
    """``t`` 1-D, at least two entries, strictly monotonic, same dtype and device as ``y0``.

    Raises ValueError otherwise. Skipped for values unknown at trace time."""
    if framework_of(t) != framework_of(y0):
        raise ValueError(
            f"t is a {type(t).__module__}.{type(t).__name__} but y0 is a "
            f"{type(y0).__module__}.{type(y0).__name__}; pass both in the same framework."
        )
    xp = array_namespace(t)
    if t.ndim != 1 or t.shape[0] < 2:
        raise ValueError(
            f"t must be a 1-D array of at least two output times, got shape {tuple(t.shape)}."
        )
    check_floating(y0)
    finite = xp.all(xp.isfinite(t)) if is_concrete(t) else None
    if finite is not None and is_concrete(finite) and not bool(finite):
        raise ValueError(f"t must be finite, got t = {t!r} (it holds NaN or Inf).")
    if t.dtype != y0.dtype:
        raise ValueError(
            f"t has dtype {t.dtype} but y0 has dtype {y0.dtype}; convert t to y0's dtype."
        )
    dev_t, dev_y = getattr(t, "device", None), getattr(y0, "device", None)
    if framework_of(t) == "torch" and dev_t != dev_y:
        raise ValueError(f"t is on {dev_t} but y0 is on {dev_y}; move t to y0's device.")
    if not is_concrete(t):
        return
    d = t[1:] - t[:-1]
    if not is_concrete(d):  # a concrete t closed over by jax.jit still computes tracers
        return
    if not (bool(xp.all(d > 0)) or bool(xp.all(d < 0))):
        raise ValueError(
            "t must be strictly increasing or strictly decreasing (a decreasing t solves "
            f"backwards in time); got t = {t!r}."
        )


def check_floating(y0: Any) -> None:
    """``y0`` must have a floating-point dtype (ODE states are real or complex numbers)."""
    xp = array_namespace(y0)
    if not xp.isdtype(y0.dtype, ("real floating", "complex floating")):
        raise ValueError(
            f"y0 must be floating point, got dtype {y0.dtype}; convert it first "
            f"(torch: y0.float() or y0.double(); JAX: y0.astype(jnp.float32))."
        )


def check_state(y0: Any) -> None:
    check_floating(y0)
    if not is_concrete(y0):
        return
    xp = array_namespace(y0)
    finite = xp.all(xp.isfinite(y0))
    if is_concrete(finite) and not bool(finite):
        raise ValueError(non_finite_y0())
