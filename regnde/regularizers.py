"""Regularizers that make neural differential equations cheap to solve.

Every regularizer is written once against the backend-neutral :class:`regnde.backend.Run`:
array-API operations on the :class:`regnde.Trace` fields with ``trace.mask``, no Python loop
over steps and no Python branch on array values, so the same code runs eagerly on torch and
under ``jax.jit``.

- :class:`GlobalError` (ERNODE) and :class:`GlobalStiffness` (SRNODE) reduce the solver's own
  per-step estimates; they need ``sensitivity="direct"``.
- :class:`LocalError` and :class:`LocalStiffness` sample one time ``tau`` and take one extra step
  there; they work with every sensitivity.
- :class:`TaylorDerivative` (TayNODE), :class:`KineticEnergy` and :class:`JacobianFrobenius`
  (RNODE) are integrals along the solution (:class:`Integral`): the backend carries them as
  extra states of the solve (see :meth:`Regularizer.integrands`); they work with every
  sensitivity on backends that augment the state (``Backend.augments``: torchdiffeq,
  diffrax).

Regularizers compose: ``2.5 * LocalError() + 0.1 * GlobalStiffness()``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from array_api_compat import array_namespace

from regnde.errors import choices
from regnde.plugins.hookspecs import hookimpl
from regnde.samplers import Sampler, index_dtype, take
from regnde.structural import Structural
from regnde.tableau import Tableau
from regnde.trace import Array, Trace
from regnde.validate import is_concrete

REDUCTIONS = ("sum", "mean", "max")

#: Size of the stability region on the negative real axis, by method: the reference
#: implementation divides stiffness estimates by it (``variant="reference"``).
STABILITY_SIZE = {"tsit5": 3.5068, "dopri5": 3.3066}

Presampled = dict[tuple[int, int], Array]


class Regularizer(Structural, ABC):
    """Base class of regnde regularizers.

    Subclasses implement :meth:`value`; :meth:`check` rejects sensitivities and methods the
    regularizer cannot work with, before any solving.
    """

    name: ClassVar[str] = "regularizer"
    needs_direct: ClassVar[bool] = False

    def check(self, *, sensitivity: str, tableau: Tableau | None, backend: str) -> None:
        """Raise ``ValueError`` if this regularizer cannot run with these choices."""
        if self.needs_direct and sensitivity != "direct":
            raise ValueError(
                f"{self!r} backpropagates through the solver's own estimates and needs "
                f"sensitivity='direct', got {sensitivity!r}. With the adjoint use a local "
                f"regularizer (LocalError / LocalStiffness), which takes one extra step and works "
                f"with any sensitivity."
            )

    def presample(self, t0: Array, t1: Array, key: Any) -> Presampled:
        """Times drawn before the solve (samplers that need no trace), by ``id`` of the term."""
        return {}

    def needs_states(self) -> bool:
        """Whether :meth:`value` needs the state at trace points the solve did not announce."""
        return False

    def integral_terms(self) -> list[Integral]:
        """The :class:`Integral` terms in this regularizer (none for most)."""
        return []

    def needs_augmentation(self) -> bool:
        """Whether the backend must carry integrands as extra states of the solve."""
        return bool(self.integral_terms())

    def integrands(self, key: Any, y0: Array) -> list[Integrand]:
        """What the backend integrates along the solution as extra states, one scalar each.

        Called once per solve, before solving, with this term's key (noise is drawn here, once
        per solve) and the initial state. The backend evaluates every integrand's ``fn`` on one
        shared :class:`regnde.backend.Point` per evaluation of the augmented field and makes
        ``run.integral(integrand.owner)`` the integral of ``fn`` over ``[t0, t1]`` (with
        ``|dt|``: non-negative for backward solves too)."""
        return []

    @abstractmethod
    def value(self, run: Any, key: Any, presampled: Presampled) -> Array:
        """The differentiable scalar for a finished solve."""

    # composition ------------------------------------------------------------------------------
    def terms(self) -> list[tuple[float, Regularizer]]:
        return [(1.0, self)]

    def __add__(self, other: object) -> Regularizer:
        if not isinstance(other, Regularizer):
            return NotImplemented
        return Sum(self.terms() + other.terms())

    def __radd__(self, other: object) -> Regularizer:
        if other == 0:
            return self
        return NotImplemented

    def __mul__(self, coef: object) -> Regularizer:
        w = weight(coef)
        return Sum([(w * c, r) for c, r in self.terms()])

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def weight(coef: object) -> float:
    """A term's weight as a float: a real number or a 0-d (one-element) tensor/array, finite
    and ``>= 0``; anything else raises a ``TypeError``/``ValueError`` that says what to do."""
    if isinstance(coef, bool) or not (
            isinstance(coef, numbers.Real) or getattr(coef, "shape", None) in ((), (1,))):
        raise TypeError(
            f"a regularizer's weight must be a real number or a 0-d tensor/array, got "
            f"{coef!r} ({type(coef).__name__}). For other coefficients multiply the value "
            f"instead: loss + lam * sol.reg."
        )
    if not is_concrete(coef):  # a traced weight (jax.jit): its value is unknown until run
        return coef  # type: ignore[return-value]
    w = float(coef)  # type: ignore[arg-type]
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(
            f"a regularizer's weight must be finite and >= 0, got {w}: a negative weight would "
            f"reward error and stiffness (more steps, not fewer). Use a positive weight, or "
            f"drop the term."
        )
    return w


class Sum(Regularizer):
    """A weighted sum of regularizers; term ``i`` draws from ``key.fold(i)``."""

    name = "sum"

    def __init__(self, terms: list[tuple[float, Regularizer]]):
        self._terms = [(weight(c), r) for c, r in terms]

    def terms(self) -> list[tuple[float, Regularizer]]:
        return list(self._terms)

    def _key(self, key: Any, i: int) -> Any:
        return key if len(self._terms) == 1 else key.fold(i)

    def check(self, *, sensitivity: str, tableau: Tableau | None, backend: str) -> None:
        for _, r in self._terms:
            r.check(sensitivity=sensitivity, tableau=tableau, backend=backend)

    def presample(self, t0: Array, t1: Array, key: Any) -> Presampled:
        out: Presampled = {}
        for i, (_, r) in enumerate(self._terms):
            out.update(r.presample(t0, t1, self._key(key, i)))
        return out

    def needs_states(self) -> bool:
        return any(r.needs_states() for _, r in self._terms)

    def integral_terms(self) -> list[Integral]:
        return [it for _, r in self._terms for it in r.integral_terms()]

    def integrands(self, key: Any, y0: Array) -> list[Integrand]:
        out: list[Integrand] = []
        seen: set[int] = set()
        for i, (_, r) in enumerate(self._terms):
            for it in r.integrands(self._key(key, i), y0):
                if id(it.owner) not in seen:  # the same instance twice: one extra state
                    seen.add(id(it.owner))
                    out.append(it)
        return out

    def value(self, run: Any, key: Any, presampled: Presampled) -> Array:
        total = None
        for i, (c, r) in enumerate(self._terms):
            v = c * r.value(run, self._key(key, i), presampled)
            total = v if total is None else total + v
        return total

    def __repr__(self) -> str:
        return " + ".join(f"{c:g} * {r!r}" for c, r in self._terms)


def _masked(trace: Trace, values: Array, reduction: str) -> Array:
    """``reduction`` of ``values`` over the real entries; on a per-sample trace (``values`` of
    ``(batch, N)``) the mean over samples of each sample's reduction."""
    xp = array_namespace(values)
    mask = trace.mask
    per_sample = values.ndim == 2
    axis = -1 if per_sample else None
    if reduction == "max":
        out = xp.max(xp.where(mask, values, xp.asarray(-math.inf, dtype=values.dtype)),
                     axis=axis)
    else:
        out = xp.sum(xp.where(mask, values, xp.zeros_like(values)), axis=axis)
        if reduction == "mean":
            n = xp.sum(xp.astype(mask, values.dtype), axis=axis)
            out = out / xp.maximum(n, xp.ones_like(n))
    return xp.mean(out) if per_sample else out


def _sample_mean(value: Array) -> Array:
    """A local step's score: scalar, or one per sample (per-sample traces), then averaged."""
    if value.ndim == 0:
        return value
    return array_namespace(value).mean(value)


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(choices("reduction", reduction, REDUCTIONS))
    return reduction


def _check_variant(variant: str) -> str:
    if variant not in ("raw", "reference"):
        raise ValueError(choices("stiffness variant", variant, ("raw", "reference")))
    return variant


def _stiffness_scale(variant: str, tableau: Tableau | None) -> float:
    if variant == "raw" or tableau is None:
        return 1.0
    return 1.0 / STABILITY_SIZE.get(tableau.name, 1.0)


def _require_stiffness(reg: Regularizer, tableau: Tableau | None, variant: str,
                       backend: str = "") -> None:
    if tableau is None or tableau.stiffness_pair is None:
        name = repr(tableau.name) if tableau is not None else "the method"
        on = f" of backend {backend!r}" if backend else ""
        raise ValueError(
            f"{reg!r} needs a method with a stiffness pair (two stages with equal c); "
            f"{name}{on} has none. Use method='dopri5' or 'tsit5' on a Runge–Kutta backend, "
            f"or an error regularizer (GlobalError, LocalError)."
        )
    if variant == "reference" and tableau.name not in STABILITY_SIZE:
        raise ValueError(
            f"variant='reference' divides by the stability-region size, known for "
            f"{sorted(STABILITY_SIZE)}, not {tableau.name!r}; use variant='raw'."
        )


class _StiffnessTerm(Regularizer):
    """A stiffness regularizer: needs a stiffness pair; ``variant="reference"`` divides by the
    method's stability-region size."""

    variant: str = "raw"

    def check(self, *, sensitivity: str, tableau: Tableau | None, backend: str) -> None:
        super().check(sensitivity=sensitivity, tableau=tableau, backend=backend)
        _require_stiffness(self, tableau, self.variant, backend)

    def scale(self, run: Any) -> float:
        return 1.0 if self.variant == "raw" else _stiffness_scale(self.variant, run.tableau)


class GlobalError(Regularizer):
    """ERNODE: ``sum_j trace.error[j] * |trace.dt[j]|`` over accepted steps.

    Args:
        reduction: ``"sum"`` (the paper), ``"mean"`` (the reference code) or ``"max"``.
    """

    name = "global-error"
    needs_direct = True

    def __init__(self, reduction: str = "sum"):
        self.reduction = _check_reduction(reduction)

    def value(self, run: Any, key: Any, presampled: Presampled) -> Array:
        trace = run.trace
        xp = array_namespace(trace.error)
        dt = xp.abs(xp.astype(trace.dt, trace.error.dtype))
        return _masked(trace, trace.error * dt, self.reduction)

    def __repr__(self) -> str:
        return f"GlobalError(reduction={self.reduction!r})"


class GlobalStiffness(_StiffnessTerm):
    """SRNODE: ``sum_j trace.stiffness[j]`` over accepted steps.

    Args:
        reduction: ``"sum"`` (the paper), ``"mean"``, or ``"max"`` (the reference code).
        variant: ``"raw"`` eigenvalue estimates, or ``"reference"`` divided by the method's
            stability-region size as the reference implementation does.
    """

    name = "global-stiffness"
    needs_direct = True

    def __init__(self, reduction: str = "sum", variant: str = "raw"):
        self.reduction = _check_reduction(reduction)
        self.variant = _check_variant(variant)

    def value(self, run: Any, key: Any, presampled: Presampled) -> Array:
        trace = run.trace
        return self.scale(run) * _masked(trace, trace.stiffness, self.reduction)

    def __repr__(self) -> str:
        return f"GlobalStiffness(reduction={self.reduction!r}, variant={self.variant!r})"


def resolve_sampler(sampler: str | Sampler) -> Sampler:
    if isinstance(sampler, str):
        from regnde.plugins.manager import registry

        return registry().get("sampler", sampler)()
    if not hasattr(sampler, "sample"):
        raise ValueError(f"sampler must be a name or an object with sample(), got {sampler!r}.")
    return sampler


def containing_step(run: Any, tau: Array) -> Array:
    """Index of the accepted step that contains ``tau`` (a scalar integer array); on a
    per-sample trace, one index per sample (``tau`` a scalar or one per sample)."""
    trace = run.trace
    xp = array_namespace(trace.t)
    direction = xp.sign(run.t1 - run.t0)
    axis = None
    if trace.t.ndim == 2:
        tau, axis = xp.reshape(tau, (-1, 1)), -1
    started = trace.mask & ((tau - trace.t) * direction >= 0)
    index = index_dtype(xp)
    n = xp.sum(xp.astype(trace.mask, index), axis=axis)
    return xp.clip(xp.sum(xp.astype(started, index), axis=axis) - 1, 0, n - 1)


class _Local(Regularizer, ABC):
    """One extra step at a sampled time ``tau``, from the solve's own ``u(tau)``.

    Args:
        sampler: ``"unbiased"``, ``"biased"``, any registered name, or a sampler object.
        dt: ``"recorded"`` (the accepted step that contains ``tau``) or ``"initial"`` (the
            backend's initial step selection at ``tau``, clipped to ``t1 - tau``; the
            reference implementation's choice).
        first_stage: ``"differentiable"`` (the exact gradient of the step's error) or
            ``"constant"`` (the reference's choice: ``f(tau, u)`` is a constant).
        state: ``"constant"`` (``u(tau)`` is a constant) or ``"differentiable"``
            (backpropagate into the solve through ``u(tau)``; ``sensitivity="direct"`` only).
        samples: number of sampled times averaged (sample ``i`` draws from ``key.fold(i)``;
            one sample, the reference's choice, uses ``key`` itself).

    The reference implementation is ``first_stage="constant", dt="initial"``.
    """

    needs_direct = False

    def __init__(
        self,
        sampler: str | Sampler = "unbiased",
        dt: str = "recorded",
        first_stage: str = "differentiable",
        state: str = "constant",
        samples: int = 1,
    ):
        self.sampler = resolve_sampler(sampler)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}.")
        self.samples = samples
        if dt not in ("recorded", "initial"):
            raise ValueError(choices("dt choice", dt, ("recorded", "initial")))
        if first_stage not in ("differentiable", "constant"):
            raise ValueError(choices("first_stage choice", first_stage,
                                     ("differentiable", "constant")))
        if state not in ("constant", "differentiable"):
            raise ValueError(choices("state choice", state, ("constant", "differentiable")))
        if dt == "initial" and first_stage == "differentiable":
            warnings.warn(
                "dt='initial' with a differentiable first stage measured no effect on NFE "
                "(RESEARCH.md: 64-68 vs 68 vanilla). Use dt='recorded' (the default) for the "
                "exact gradient, or first_stage='constant' to reproduce the reference.",
                UserWarning,
                stacklevel=3,
            )
        self.dt = dt
        self.first_stage = first_stage
        self.state = state

    def check(self, *, sensitivity: str, tableau: Tableau | None, backend: str) -> None:
        super().check(sensitivity=sensitivity, tableau=tableau, backend=backend)
        if self.state == "differentiable" and sensitivity != "direct":
            raise ValueError(
                f"{self!r}: state='differentiable' backpropagates into the solve and needs "
                f"sensitivity='direct'; with {sensitivity!r} use state='constant'."
            )

    def _keys(self, key: Any) -> list[Any]:
        return [key] if self.samples == 1 else [key.fold(i) for i in range(self.samples)]

    def presample(self, t0: Array, t1: Array, key: Any) -> Presampled:
        if self.sampler.needs_trace:
            return {}
        return {(id(self), i): self.sampler.sample(None, t0, t1, k)
                for i, k in enumerate(self._keys(key))}

    def needs_states(self) -> bool:
        return bool(self.sampler.needs_trace)

    def value(self, run: Any, key: Any, presampled: Presampled) -> Array:
        values = [_sample_mean(self.score(run, *self.local_step(run, k,
                                                                presampled.get((id(self), i)))))
                  for i, k in enumerate(self._keys(key))]
        return values[0] if self.samples == 1 else sum(values[1:], values[0]) / self.samples

    @abstractmethod
    def score(self, run: Any, st: Any, dt: Array) -> Array:
        """The regularizer's value for one extra step ``st`` of size ``dt``."""

    def local_step(self, run: Any, key: Any, tau: Array | None = None) -> tuple[Any, Array]:
        """The extra step at ``tau`` (drawn from ``key`` if ``None``) and its ``dt``."""
        if tau is None:
            tau = self.sampler.sample(run.trace, run.t0, run.t1, key)
        u = run.state_at(tau, differentiable=self.state == "differentiable")
        if self.dt == "recorded":
            dt = take(run.trace.dt, containing_step(run, tau))
        else:
            dt = run.initial_dt(tau, u)
        return run.step(tau, u, dt, first_stage=self.first_stage), dt

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sampler={self.sampler!r}, dt={self.dt!r}, "
                f"first_stage={self.first_stage!r})")


class LocalError(_Local):
    """Local error regularization: ``error(tau) * |dt|`` of one extra step at ``tau``."""

    name = "local-error"

    def score(self, run: Any, st: Any, dt: Array) -> Array:
        xp = array_namespace(st.error)
        return st.error * xp.abs(xp.astype(dt, st.error.dtype))


class LocalStiffness(_Local, _StiffnessTerm):
    """Local stiffness regularization: Shampine's estimate of one extra step at ``tau``.

    Args:
        variant: ``"raw"`` or ``"reference"`` (divided by the stability-region size).
    """

    name = "local-stiffness"

    def __init__(self, sampler: str | Sampler = "biased", dt: str = "recorded",
                 first_stage: str = "differentiable", state: str = "constant",
                 samples: int = 1, variant: str = "raw"):
        super().__init__(sampler=sampler, dt=dt, first_stage=first_stage, state=state,
                         samples=samples)
        self.variant = _check_variant(variant)

    def score(self, run: Any, st: Any, dt: Array) -> Array:
        return self.scale(run) * st.stiffness


# -- integrals along the solution (TayNODE, RNODE) ---------------------------------------------
@dataclass(frozen=True)
class Integrand:
    """One scalar integrated along the solution as an extra state of the solve.

    Attributes:
        owner: the regularizer whose ``run.integral(owner)`` this becomes.
        fn: ``fn(point) -> scalar`` for a :class:`regnde.backend.Point`; differentiable.
        uses: what ``fn`` asks of the point (``"f"``, ``"derivatives"``, ``"vjp"``), so a
            backend can prepare it once for all integrands.
        order: the highest derivative order ``fn`` asks for (``0``: none).
        mode: how the derivatives are computed (``"taylor"`` or ``"jvp"``).
    """

    owner: Regularizer
    fn: Callable[[Any], Array]
    uses: frozenset[str] = field(default_factory=lambda: frozenset({"f"}))
    order: int = 0
    mode: str = "taylor"


class Integral(Regularizer):
    """A regularizer ``integral over [t0, t1] of g(t, y(t)) |dt|``, carried as an extra state.

    Subclasses implement :meth:`integrand` (backend-neutral: it only uses the
    :class:`regnde.backend.Point` and array-API operations) and may draw per-solve noise in
    :meth:`prepare`. Works with every sensitivity and method on backends that augment the
    state; the drop-in :func:`regnde.regularize` cannot (it does not own the solve's state).
    """

    uses: ClassVar[frozenset[str]] = frozenset({"f"})

    def integral_terms(self) -> list[Integral]:
        return [self]

    def prepare(self, key: Any, y0: Array) -> Any:
        """Per-solve data for :meth:`integrand` (noise), drawn from ``key``; ``None`` here."""
        return None

    @abstractmethod
    def integrand(self, point: Any, data: Any) -> Array:
        """``g(t, y)``: a differentiable scalar at one point of the solution."""

    def derivative_order(self) -> int:
        """The highest time-derivative order :meth:`integrand` asks of the point (0: none)."""
        return 0

    def derivative_mode(self) -> str:
        return "taylor"

    def integrands(self, key: Any, y0: Array) -> list[Integrand]:
        data = self.prepare(key, y0)
        return [Integrand(self, lambda point: self.integrand(point, data), uses=self.uses,
                          order=self.derivative_order(), mode=self.derivative_mode())]

    def value(self, run: Any, key: Any, presampled: Presampled) -> Array:
        return run.integral(self)


def _mean_square(x: Array) -> Array:
    xp = array_namespace(x)
    return xp.mean(x * x)


class TaylorDerivative(Integral):
    """TayNODE: ``R_K = integral over [t0, t1] of mean((d^K y / dt^K)^2) dt``.

    ``d^K y / dt^K`` is the total time derivative of the solution (time-dependent fields
    included), computed at every evaluation of the augmented field by Taylor mode; the mean runs
    over every element of the state (batch and features). For ``y' = y``, ``y(0) = 1`` on
    ``[0, 1]``: ``R_K = (e^2 - 1) / 2`` for every ``K``.

    Args:
        order: ``K >= 1`` (an int). ``K = 1`` is twice :class:`KineticEnergy`.
        mode: ``"taylor"`` (Taylor mode, cost ``O(K^2)``; on torch, operations without a rule
            fall back to nested jvp with a warning, see ``regnde.adapters.torch.taylor``) or
            ``"jvp"`` (nested first-order forward mode on the whole field, cost ``O(2^K)``; a
            reference). Same value.
    """

    name = "taylor-derivative"
    uses = frozenset({"derivatives"})

    def __init__(self, order: int = 3, mode: str = "taylor"):
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
            raise ValueError(
                f"TaylorDerivative order must be an int >= 1 (the K of d^K y / dt^K), got "
                f"{order!r}."
            )
        if mode not in ("taylor", "jvp"):
            raise ValueError(choices("TaylorDerivative mode", mode, ("taylor", "jvp")))
        self.order: int = int(order)
        self.mode: str = mode

    def derivative_order(self) -> int:
        return self.order

    def derivative_mode(self) -> str:
        return self.mode

    def integrand(self, point: Any, data: Any) -> Array:
        return _mean_square(point.derivatives(self.order, mode=self.mode)[-1])

    def __repr__(self) -> str:
        mode = "" if self.mode == "taylor" else f", mode={self.mode!r}"
        return f"TaylorDerivative(order={self.order}{mode})"


class KineticEnergy(Integral):
    """RNODE's kinetic energy: ``integral over [t0, t1] of 0.5 * mean(f(t, y)^2) dt``.

    Uses the field value the solve computes anyway (no extra evaluation of ``f``)."""

    name = "kinetic-energy"
    uses = frozenset({"f"})

    def integrand(self, point: Any, data: Any) -> Array:
        return 0.5 * _mean_square(point.f())


NOISES = ("gaussian", "rademacher")


class JacobianFrobenius(Integral):
    """RNODE's Jacobian term: ``integral over [t0, t1] of mean((e^T df/dy)^2) dt``.

    Hutchinson's estimator with one noise draw ``e`` (``y0.shape``) per solve from the solve's
    ``key``: its expectation is ``integral ||df/dy||_F^2 / D dt`` for a ``D``-element state
    (the mean runs over every element, batch included). One vector-Jacobian product per
    evaluation of the augmented field.

    Args:
        noise: ``"gaussian"`` or ``"rademacher"``.
    """

    name = "jacobian-frobenius"
    uses = frozenset({"vjp"})

    def __init__(self, noise: str = "gaussian"):
        if noise not in NOISES:
            raise ValueError(choices("JacobianFrobenius noise", noise, NOISES))
        self.noise = noise

    def prepare(self, key: Any, y0: Array) -> Array:
        return key.normal(y0) if self.noise == "gaussian" else key.rademacher(y0)

    def integrand(self, point: Any, data: Any) -> Array:
        return _mean_square(point.vjp(data))

    def __repr__(self) -> str:
        return f"JacobianFrobenius(noise={self.noise!r})"


def as_regularizer(reg: Any) -> Regularizer:
    """A :class:`Regularizer` from an instance or a registered name."""
    if isinstance(reg, Regularizer):
        return reg
    if isinstance(reg, str):
        from regnde.plugins.manager import registry

        return registry().get("regularizer", reg)()
    raise ValueError(
        f"regularizer must be a regnde regularizer or a registered name, got {reg!r}; "
        f"for example regnde.regularizers.LocalError()."
    )


@hookimpl
def regnde_register_regularizers(register: Callable[[str, type], None]) -> None:
    for cls in (GlobalError, GlobalStiffness, LocalError, LocalStiffness, TaylorDerivative,
                KineticEnergy, JacobianFrobenius):
        register(cls.name, cls)
