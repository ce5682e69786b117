"""The user-facing entry points: :func:`solve`, :func:`step`, :func:`backends`, :func:`methods`."""

from __future__ import annotations

from typing import Any

from regnde.backend import Backend, SolveRequest, StepRequest
from regnde.errors import choices
from regnde.plugins.manager import registry
from regnde.tableau import Tableau
from regnde.trace import Solution, StepResult
from regnde.validate import check_options, check_state, check_times, framework_of


def backends() -> list[str]:
    """Names of the registered backends."""
    return registry().names("backend")


def methods(backend: str, sde: bool = False) -> list[str]:
    """Adaptive methods of ``backend``: its own and, if it runs tableaus, every registered one.

    ``sde=True``: the methods it solves SDEs with, where they differ
    (:meth:`~regnde.backend.Backend.sde_methods`)."""
    b = registry().backend(backend)
    if sde and b.sde_methods() is not None:
        return sorted(b.sde_methods() or {})
    names = set(b.native_methods())
    if b.runs_tableaus:
        names |= set(registry().tableaus())
    return sorted(names)


def is_sde(f: Any) -> bool:
    """Whether ``f`` has the torchsde interface (drift ``f``, diffusion ``g``, ``noise_type``)."""
    return hasattr(f, "g") and hasattr(f, "noise_type")


def default_backend(x: Any, sde: bool = False, label: str = "y0") -> str:
    """The backend ``backend=None`` picks for arrays like ``x``: among the registered backends
    whose :attr:`~regnde.backend.Backend.framework` is ``x``'s and that declare themselves the
    default for ODEs (``sde=True``: SDEs) in :attr:`~regnde.backend.Backend.default_for`, a
    built-in before a third-party one, else the first registered. ``label`` names ``x`` in
    the error.

    Raises:
        ValueError: no registered backend declares it; the message lists the backends that take
            such arrays (to name one) or, if none does, the frameworks that have a default.
    """
    reg = registry()
    fw, kind = framework_of(x), "sde" if sde else "ode"
    found = reg.defaults(fw, kind)
    if found:
        return found[0]
    what = f"{type(x).__module__}.{type(x).__name__}"
    same = reg.of_framework(fw)
    if same:
        fix = (f"name one of the backends that take {fw} arrays (backend=...): "
               f"{', '.join(same)}.")
    else:
        others = sorted({str(reg.capability(n, "framework")) for n in reg.defaults(None, kind)})
        fix = (f"pass an array of a framework that has one ({', '.join(others) or 'none'}), or "
               f"name a backend (backend=...): {', '.join(reg.names('backend'))}.")
    raise ValueError(
        f"cannot infer a backend from {label} of type {what}: no registered backend declares "
        f"itself the default for {kind.upper()}s on {fw} arrays (Backend.default_for); {fix}"
        + reg.failure_note()
    )


def resolve_backend(backend: str | None, f: Any, y0: Any) -> Backend:
    reg = registry()
    if backend is None:
        backend = default_backend(y0, is_sde(f))
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a name (str) or None, got {backend!r}.")
    b = reg.backend(backend)
    if not b.owns(y0):
        fits = reg.defaults(framework_of(y0), "sde" if is_sde(f) else "ode")
        hint = f" backend={fits[0]!r} fits y0." if fits else ""
        raise ValueError(
            f"backend {backend!r} takes {b.framework} arrays but y0 is a "
            f"{type(y0).__module__}.{type(y0).__name__}.{hint}"
        )
    return b


def resolve_method(b: Backend, method: str | None, sde: bool = False
                   ) -> tuple[str, Tableau | None]:
    """Canonical method name and its tableau (``None`` for methods without one).

    ``sde``: the method of an SDE solve (a backend's :meth:`Backend.sde_methods`, if it has
    them; an empty name lets the backend choose by the SDE's type)."""
    sde_methods = b.sde_methods() if sde else None
    if sde_methods is not None:
        if method is None:
            return "", None
        if not isinstance(method, str):
            raise ValueError(f"method must be a name (str) or None, got {method!r}.")
        if method not in sde_methods:
            raise ValueError(choices(f"SDE method of backend {b.name!r}", method, sde_methods))
        return method, sde_methods[method]
    if method is None:
        if b.default_method is None:
            return "", None
        method = b.default_method
    if not isinstance(method, str):
        raise ValueError(f"method must be a name (str) or None, got {method!r}.")
    name = b.aliases().get(method, method)
    native = b.native_methods()
    tableaus = registry().tableaus() if b.runs_tableaus else {}
    if name in native:
        return name, native[name] if native[name] is not None else tableaus.get(name)
    if name in tableaus:
        return name, tableaus[name]
    elsewhere = [n for n in backends() if n != b.name and _has_method(n, name)]
    hint = f"It is a method of backend(s): {', '.join(elsewhere)}." if elsewhere else ""
    hint += registry().failure_note()  # a plugin that failed to load may have provided it
    raise ValueError(choices(f"method of backend {b.name!r}", method, methods(b.name),
                             hint.strip()))


def _augments(backend: str) -> bool:
    try:
        return bool(registry().backend(backend).augments)
    except Exception:
        return False


def _has_method(backend: str, method: str) -> bool:
    try:
        b = registry().backend(backend)
    except Exception:
        return False
    return method in b.native_methods() or method in b.aliases() or (
        b.runs_tableaus and method in registry().tableaus()
    )


def default_tolerances(b: Backend, sde: bool, rtol: Any, atol: Any) -> tuple[Any, Any]:
    """``(rtol, atol)`` with ``None`` replaced by the backend's defaults for ODEs or SDEs
    (:attr:`Backend.ode_tolerances`, :attr:`Backend.sde_tolerances`)."""
    default = b.sde_tolerances if sde else b.ode_tolerances
    return (default[0] if rtol is None else rtol, default[1] if atol is None else atol)


def solve(
    f: Any,
    y0: Any,
    t: Any,
    backend: str | None = None,
    method: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    sensitivity: str = "direct",
    regularizer: Any = None,
    key: Any = None,
    max_steps: int = 4096,
    trace: str = "full",
    steer: float | None = None,
    **options: Any,
) -> Solution:
    """Solve ``dy/dt = f(t, y)`` with an adaptive solver, record its steps, and regularize.

    Args:
        f: vector field ``f(t, y)`` in the backend's framework (an SDE object with ``f``/``g``
            for SDE backends).
        y0: initial state, any shape; the leading axis is part of one system (shared steps).
        t: ``(T,)`` strictly monotonic output times; decreasing solves backwards in time.
        backend: a registered backend name; ``None`` infers it from ``y0`` and ``f`` (ODE or
            SDE): the backend that declares itself the default for them
            (:func:`default_backend`).
        method: a method of that backend (see :func:`methods`); ``None``: its default.
        rtol, atol: tolerances of the step-size controller; ``None``: the backend's defaults
            (:func:`default_tolerances`): 1e-6/1e-6 for ODEs on every backend, 1e-5/1e-4 for
            SDEs (torchsde's own), so switching backends never changes the accuracy asked for.
        sensitivity: ``"direct"`` (backpropagate through the solver) or ``"adjoint"``.
        regularizer: a regnde regularizer or ``None``.
        key: randomness for samplers: int seed, ``torch.Generator``, JAX PRNG key or ``None``.
        max_steps: limit on all steps (accepted and rejected).
        trace: ``"full"`` records states per step; ``"summary"`` only t, dt, error, stiffness.
        steer: STEER's half-width ``b``: the last output time becomes ``T ~ U(t1 - b, t1 + b)``
            drawn from ``key`` (see :func:`regnde.steer`); ``ys[-1]`` is the state at ``T``.
            ``0 < b < |t[-1] - t[-2]|``, else ``ValueError``.
        **options: backend options passed through unchanged.

    Returns:
        :class:`Solution` with ``ys`` of shape ``(T, *y0.shape)``, differentiable w.r.t. ``y0``
        and the parameters of ``f`` (through the solver or by the adjoint), and ``reg``.
    """
    check_options(sensitivity, trace, max_steps, rtol, atol)
    b = resolve_backend(backend, f, y0)
    check_times(t, y0)
    check_state(y0)
    name, tableau = resolve_method(b, method, sde=is_sde(f))
    rtol, atol = default_tolerances(b, is_sde(f), rtol, atol)
    if sensitivity not in b.sensitivities:
        raise ValueError(choices(f"sensitivity of backend {b.name!r}", sensitivity,
                                 b.sensitivities))
    if regularizer is not None:
        from regnde.regularizers import as_regularizer

        regularizer = as_regularizer(regularizer)
        regularizer.check(sensitivity=sensitivity, tableau=tableau, backend=b.name)
        if regularizer.needs_augmentation() and not b.augments:
            able = [n for n in backends() if _augments(n)]
            raise ValueError(
                f"{regularizer!r} integrates along the solution as an extra state, which backend "
                f"{b.name!r} does not support; backends that do: {', '.join(able) or 'none'}. "
                f"Use an error or stiffness regularizer (LocalError, GlobalError, ...) here."
            )
    if steer is not None:
        from regnde.steer import steer_times

        t = steer_times(t, steer, b.make_key(key))
    request = SolveRequest(f=f, y0=y0, t=t, method=name, tableau=tableau, rtol=rtol, atol=atol,
                           sensitivity=sensitivity, regularizer=regularizer, key=key,
                           max_steps=max_steps, trace=trace, options=dict(options))
    return b.solve(request)


def step(
    f: Any,
    t: Any,
    y: Any,
    backend: str | None = None,
    method: str | None = None,
    dt: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    **options: Any,
) -> StepResult:
    """One step of ``method`` from ``(t, y)``.

    Args:
        t: scalar start time. y: state, any shape. dt: signed step size, or ``None`` for the
            backend's own initial step selection. On a backend whose samples step
            independently (:attr:`regnde.backend.Backend.per_sample_steps`), ``t`` and ``dt``
            may also be one per sample, ``(batch,)``, and ``error``/``stiffness`` are
            ``(batch,)``.

    Returns:
        :class:`StepResult` (``y1``, ``error``, ``stiffness``, ``stages``), differentiable w.r.t.
        ``y`` and the parameters of ``f``; ``dt`` is a constant.
    """
    check_options("direct", "full", 1, rtol, atol)
    b = resolve_backend(backend, f, y)
    check_state(y)
    name, tableau = resolve_method(b, method, sde=is_sde(f))
    rtol, atol = default_tolerances(b, is_sde(f), rtol, atol)
    return b.step(StepRequest(f=f, t=t, y=y, method=name, tableau=tableau, dt=dt, rtol=rtol,
                              atol=atol, options=dict(options)))
