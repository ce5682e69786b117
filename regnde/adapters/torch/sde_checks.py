r"""torchsde's methods and options as regnde sees them, the checks of a torchsde call, and the
default Brownian motion.

Holds torchsde's internal modules (``ts_methods``, ``ts_sdeint``, ``ts_adjoint``), torchsde's
own ``methods.select`` (:data:`ORIGINAL_SELECT`, before regnde patches it), the method and
option tables, :func:`default_method` and :func:`working_methods`, the ``check_*`` functions
that turn what torchsde would refuse late (or only warn about) into early ``ValueError``\ s,
:func:`noise_channels`, and :func:`brownian_interval` (the Brownian motion a key seeds).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torchsde  # noqa: F401  (imports the submodules below)
from torchsde import BrownianInterval
from torchsde._core import base_sde
from torchsde.settings import LEVY_AREA_APPROXIMATIONS, METHODS, NOISE_TYPES, SDE_TYPES

from regnde.adapters.torch.keys import TorchKey
from regnde.regularizers import GlobalError, LocalError, LocalStiffness

# torchsde._core.__init__ does not shadow these, but import them as modules explicitly.
ts_methods = importlib.import_module("torchsde._core.methods")
ts_sdeint = importlib.import_module("torchsde._core.sdeint")
ts_adjoint = importlib.import_module("torchsde._core.adjoint")

ORIGINAL_SELECT: Callable[..., Any] = ts_methods.select

#: Methods regnde runs adaptively: every torchsde method but ``adjoint_reversible_heun``, which
#: only exists as the backward solver of ``reversible_heun`` under the adjoint.
METHOD_NAMES: tuple[str, ...] = tuple(m for m in METHODS.all()
                                      if m != METHODS.adjoint_reversible_heun)
#: Methods whose solver refuses the adjoint SDE (srk.py:46, log_ode.py:32): no ``adjoint_method``.
ADJOINT_REFUSED = (METHODS.srk, METHODS.log_ode_midpoint)
#: Noise type of the adjoint SDE by noise type of the forward one (adjoint_sde.py:36).
ADJOINT_NOISE = {NOISE_TYPES.general: NOISE_TYPES.general,
                 NOISE_TYPES.additive: NOISE_TYPES.general,
                 NOISE_TYPES.scalar: NOISE_TYPES.scalar,
                 NOISE_TYPES.diagonal: NOISE_TYPES.diagonal}
#: torchsde's keyword arguments of ``sdeint`` (and the extra ones of ``sdeint_adjoint``).
SDE_OPTIONS = ("bm", "dt", "adaptive", "dt_min", "options", "names", "logqp", "extra",
               "extra_solver_state")
ADJOINT_OPTIONS = ("adjoint_method", "adjoint_adaptive", "adjoint_rtol", "adjoint_atol",
                   "adjoint_options", "adjoint_params")
_SDEINT_DEFAULTS = {k: p.default for k, p in
                    inspect.signature(ts_sdeint.sdeint).parameters.items()}
DEFAULT_DT: float = _SDEINT_DEFAULTS["dt"]
DEFAULT_DT_MIN: float = _SDEINT_DEFAULTS["dt_min"]
#: The key stream that seeds the Brownian motion (samplers use the key itself or ``fold(i)``).
BROWNIAN_STREAM = 0x5DE


# -- checks ------------------------------------------------------------------------------------
def default_method(sde_type: str, noise_type: str) -> str:
    """torchsde's own default method (sdeint.py:144)."""
    if sde_type == SDE_TYPES.stratonovich:
        return METHODS.midpoint
    return METHODS.euler if noise_type == NOISE_TYPES.general else METHODS.srk


def _fits(method: str, sde_type: str, noise_type: str) -> bool:
    cls = ORIGINAL_SELECT(method, sde_type)
    return bool(cls.sde_type == sde_type and noise_type in cls.noise_types)


def working_methods(sde_type: str, noise_type: str, adjoint: bool = False) -> list[str]:
    """Methods that solve an SDE of this type and noise type (as ``adjoint_method`` if
    ``adjoint``: then the adjoint SDE's noise type counts, and srk and log_ode refuse)."""
    if adjoint:
        noise_type = ADJOINT_NOISE[noise_type]
    return [m for m in METHOD_NAMES if _fits(m, sde_type, noise_type)
            and not (adjoint and m in ADJOINT_REFUSED)]


def levy_area(method: str) -> str:
    """The Levy area torchsde's default Brownian motion computes for ``method`` (sdeint.py:258)."""
    if method == METHODS.srk:
        return LEVY_AREA_APPROXIMATIONS.space_time
    if method == METHODS.log_ode_midpoint:
        return LEVY_AREA_APPROXIMATIONS.foster
    return LEVY_AREA_APPROXIMATIONS.none


def check_sde(sde: Any) -> None:
    for attr, valid in (("noise_type", NOISE_TYPES.all()), ("sde_type", SDE_TYPES.all())):
        value = getattr(sde, attr, None)
        if value not in valid:
            raise ValueError(
                f"the SDE's {attr} is {value!r}; torchsde needs one of {', '.join(valid)}. "
                f"Set sde.{attr} (torchsde.SDEIto / SDEStratonovich set sde_type)."
            )
    if not any(callable(getattr(sde, n, None)) for n in ("f", "f_and_g", "f_and_g_prod")):
        raise ValueError(f"the SDE {type(sde).__name__} has no drift: define f(t, y).")


def check_method(method: str, sde_type: str, noise_type: str) -> None:
    if not _fits(method, sde_type, noise_type):
        ok = working_methods(sde_type, noise_type)
        raise ValueError(
            f"method {method!r} of backend 'torchsde' does not solve {sde_type} SDEs with "
            f"{noise_type} noise; methods that do: {', '.join(ok)}."
        )


def check_adjoint(method: str, options: Mapping[str, Any], sde_type: str, noise_type: str,
                  adaptive: bool) -> None:
    """Reject adjoint methods torchsde would only refuse in the backward pass."""
    given = options.get("adjoint_method")
    if given is None:
        probe = SimpleNamespace(noise_type=noise_type, sde_type=sde_type)
        adjoint_method = ts_adjoint._select_default_adjoint_method(probe, method, None)
    else:
        adjoint_method = given
    ok = working_methods(sde_type, noise_type, adjoint=True)
    if adjoint_method == METHODS.adjoint_reversible_heun:
        if method != METHODS.reversible_heun:
            raise ValueError(
                f"adjoint_method='adjoint_reversible_heun' is the backward solver of "
                f"method='reversible_heun' only, got method={method!r}; adjoint methods that "
                f"work here: {', '.join(ok)}."
            )
        if adaptive:
            raise ValueError(
                "method='reversible_heun' with sensitivity='adjoint' uses its algebraically "
                "reversible adjoint, which does not save adaptive steps (torchsde warns its "
                "gradients are then inaccurate). Pass adjoint_method= one of "
                f"{', '.join(ok)}, or adaptive=False (no error regularizers then)."
            )
        return
    if adjoint_method not in ok:
        why = ("refuses the adjoint SDE (it needs the diffusion itself)"
               if adjoint_method in ADJOINT_REFUSED else
               f"does not solve the adjoint SDE ({sde_type}, "
               f"{ADJOINT_NOISE[noise_type]} noise)")
        raise ValueError(
            f"adjoint_method {adjoint_method!r} {why}; adjoint methods that work here: "
            f"{', '.join(ok)}. Pass adjoint_method=... or use sensitivity='direct'."
        )


def check_options(options: Mapping[str, Any], sensitivity: str) -> None:
    allowed = SDE_OPTIONS + (ADJOINT_OPTIONS if sensitivity == "adjoint" else ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        own = {"rtol", "atol", "method", "max_steps", "key"} & set(unknown)
        hint = (f" {sorted(own)} are keywords of regnde.solve itself." if own else "")
        adj = sorted(set(unknown) & set(ADJOINT_OPTIONS))
        if adj:
            hint += f" {adj} need sensitivity='adjoint'."
        raise ValueError(
            f"unknown torchsde option(s) {unknown} for sensitivity={sensitivity!r}; allowed: "
            f"{', '.join(allowed)}.{hint}"
        )


def check_state_shape(y0: torch.Tensor) -> None:
    if y0.dim() != 2:
        raise ValueError(
            f"torchsde needs y0 of shape (batch, d), got shape {tuple(y0.shape)}; reshape it, "
            f"e.g. y0.reshape(1, -1) for a single state."
        )


def noise_channels(sde: Any, names: Mapping[str, str], y0: torch.Tensor, t0: torch.Tensor
                   ) -> int:
    """Brownian channels ``m``; checks the diffusion's shape (one evaluation, no gradient)."""
    g_fn = getattr(sde, names.get("diffusion", "g"), None)
    fg_fn = getattr(sde, names.get("drift_and_diffusion", "f_and_g"), None)
    if not callable(g_fn) and not callable(fg_fn):
        return y0.shape[1]  # only products given: torchsde checks them (and needs bm)
    with torch.no_grad():
        g = g_fn(t0, y0) if callable(g_fn) else fg_fn(t0, y0)[1]  # type: ignore[misc]
    b, d = y0.shape
    noise = sde.noise_type
    if noise == NOISE_TYPES.diagonal:
        if tuple(g.shape) != (b, d):
            raise ValueError(
                f"the diffusion g(t, y) of an SDE with diagonal noise must have the shape of y, "
                f"(batch, d) = {(b, d)}; got {tuple(g.shape)}. Return one entry per state, or "
                f"set noise_type='general' for a (batch, d, m) diffusion matrix."
            )
        return d
    m_hint = "1" if noise == NOISE_TYPES.scalar else "m"
    if g.dim() != 3 or tuple(g.shape[:2]) != (b, d) or (noise == NOISE_TYPES.scalar
                                                        and g.shape[2] != 1):
        raise ValueError(
            f"the diffusion g(t, y) of an SDE with {noise} noise must have shape "
            f"(batch, d, {m_hint}) = ({b}, {d}, {m_hint}); got {tuple(g.shape)}. For one noise "
            f"channel per state use noise_type='diagonal' and shape (batch, d)."
        )
    return int(g.shape[2])


def only_local(regularizer: Any) -> bool:
    """Whether every term takes its own extra step (and never reads ``trace.error``)."""
    return regularizer is not None and all(
        isinstance(r, (LocalError, LocalStiffness)) for _, r in regularizer.terms())


def uses_error(regularizer: Any) -> bool:
    return any(isinstance(r, (GlobalError, LocalError)) for _, r in regularizer.terms())


def brownian_interval(key: TorchKey, t: torch.Tensor, size: tuple[int, ...], like: torch.Tensor,
                      method: str) -> BrownianInterval:
    """The Brownian motion for ``key``: torchsde's default ``BrownianInterval`` over
    ``[t[0], t[-1]]`` with an entropy drawn from ``key.fold(BROWNIAN_STREAM)``."""
    u = key.fold(BROWNIAN_STREAM).uniform(torch.zeros((), dtype=torch.float64))
    entropy = int(float(u) * 2**53)
    return BrownianInterval(t0=t[0], t1=t[-1], size=size, dtype=like.dtype, device=like.device,
                            entropy=entropy, levy_area_approximation=levy_area(method))


def renamed(sde: Any, names: Mapping[str, str] | None) -> Any:
    return base_sde.RenameMethodsSDE(sde, **names) if names else sde

