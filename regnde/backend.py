"""The contract a backend implements, and what regularizers see of a finished solve.

Nothing here imports torch or jax: a backend adapter (a plugin module in
``regnde/adapters``) implements :class:`Backend` for one framework.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from regnde.tableau import Tableau
from regnde.trace import Array, Solution, StepResult, Trace

SENSITIVITIES = ("direct", "adjoint")
#: What :attr:`Backend.default_for` may hold.
DEFAULT_KINDS = ("ode", "sde")
TRACE_MODES = ("full", "summary")


class Key(Protocol):
    """A backend's source of randomness for samplers (made by :meth:`Backend.make_key`)."""

    def uniform(self, like: Array) -> Array:
        """A scalar uniform on ``[0, 1)`` with the dtype and device of ``like``."""
        ...

    def fold(self, index: int) -> Key:
        """An independent key derived from this one and ``index``."""
        ...

    def normal(self, like: Array) -> Array:
        """Standard normal noise with the shape, dtype and device of ``like`` (needed by
        integral regularizers with Hutchinson noise, e.g. ``JacobianFrobenius``)."""
        ...

    def rademacher(self, like: Array) -> Array:
        """Noise of ``+-1`` with equal probability, shaped like ``like``."""
        ...


class Point(Protocol):
    """The vector field at one point ``(t, y)`` of a solve, as an integrand sees it.

    A backend that augments the state (:attr:`Backend.augments`) makes one per evaluation of the
    augmented vector field and passes it to every :class:`regnde.regularizers.Integrand`; what
    several integrands ask for is computed once. Everything is differentiable w.r.t. ``y`` and
    the parameters of ``f`` (through the solver, or by the adjoint of the augmented system).

    Attributes:
        t: scalar time (the user's direction). y: the state, ``y0.shape``.
    """

    t: Array
    y: Array

    def f(self) -> Array:
        """``f(t, y)``, ``y0.shape``: the same values the solve itself uses."""
        ...

    def derivatives(self, order: int, mode: str = "taylor") -> list[Array]:
        """``[dy/dt, d^2y/dt^2, ..., d^order y/dt^order]``: total time derivatives of the
        solution through ``(t, y)`` (time-dependent fields included), each ``y0.shape``.

        ``mode="taylor"``: Taylor mode, cost ``O(order^2)`` (torch: a traced tape;
        JAX: ``jax.experimental.jet``); ``"jvp"``: nested first-order forward mode, cost
        ``O(2^order)``. Same values."""
        ...

    def vjp(self, e: Array) -> Array:
        """``e^T df/dy`` at ``(t, y)``, ``y0.shape`` (``e`` of ``y0.shape``)."""
        ...


class Run(Protocol):
    """A finished solve, as a regularizer sees it (times in the user's direction).

    Attributes:
        trace: the :class:`Trace`. t0, t1: start and end time (scalars of the backend).
        sensitivity: ``"direct"`` or ``"adjoint"``. tableau: the method that ran.
    """

    trace: Trace
    t0: Array
    t1: Array
    sensitivity: str
    tableau: Tableau

    def state_at(self, tau: Array, differentiable: bool = False) -> Array:
        """The solution at ``tau`` from the solver's own dense output, ``y0.shape``.

        Constant unless ``differentiable`` (possible with ``sensitivity="direct"`` only)."""
        ...

    def step(
        self, tau: Array, y: Array, dt: Array, first_stage: str = "differentiable"
    ) -> StepResult:
        """One step of the solve's method, tolerances and vector field from ``(tau, y)``.

        Differentiable w.r.t. ``y`` and the vector field's parameters; ``dt`` is a constant.
        ``first_stage="constant"`` treats ``f(tau, y)`` as a constant (the reference's choice).
        """
        ...

    def initial_dt(self, tau: Array, y: Array) -> Array:
        """The backend's initial step-size selection at ``(tau, y)``, clipped to ``t1 - tau``."""
        ...

    def integral(self, reg: Any) -> Array:
        """The value over the solve of the integral regularizer ``reg`` (scalar), carried as an
        extra state; differentiable by the solve's sensitivity. Only on backends that
        :attr:`Backend.augments`."""
        ...


@dataclass
class SolveRequest:
    """Everything :func:`regnde.solve` passes to a backend, validated and resolved."""

    f: Any
    y0: Any
    t: Any
    method: str
    tableau: Tableau | None
    rtol: Any
    atol: Any
    sensitivity: str
    regularizer: Any
    key: Any
    max_steps: int
    trace: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepRequest:
    """Everything :func:`regnde.step` passes to a backend."""

    f: Any
    t: Any
    y: Any
    method: str
    tableau: Tableau | None
    dt: Any
    rtol: Any
    atol: Any
    options: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """A solver suite behind regnde's protocol.

    Class attributes:
        name: registry name. framework: the top-level module of the arrays it takes, as
            :func:`regnde.validate.framework_of` names it (``"torch"``, ``"jax"``, ...).
        sensitivities: the sensitivities :meth:`solve` supports.
        runs_tableaus: whether registered tableaus become methods of this backend.
        sde: whether the backend solves SDEs.
        augments: whether :meth:`solve` carries the integrands of integral regularizers
            (:meth:`regnde.regularizers.Regularizer.integrands`) as extra states: it solves
            ``(y, r)`` with ``dr/dt = sign(t1 - t0) * [g_1(point), ..., g_m(point)]`` from
            ``r(t0) = 0``, with an error norm that looks at ``y`` only (so the accepted steps,
            ``trace.error`` and ``ys`` are those of the plain solve), and answers
            ``run.integral(reg)`` from ``r(t1)``.
        per_sample_steps: whether the samples of a batch step independently (torchode): the
            :class:`regnde.Trace` is then in its per-sample form (``(batch, N)`` fields,
            ``n_steps`` and ``stats.n_steps``/``n_rejected`` of shape ``(batch,)``), ``f``
            receives one time per sample, and :meth:`step` and :meth:`Run.step` take one
            ``t``/``dt`` per sample (or one for all) and return per-sample ``error`` and
            ``stiffness``, ``(batch,)``. ``False``: one trace for the whole batch, scalar errors.

    Capabilities the core reads instead of naming backends (so a third-party backend gets
    every feature a built-in one has):
        default_for: ``"ode"`` and/or ``"sde"``: ``backend=None`` picks this backend for ``y0``
            of its :attr:`framework` (ODEs / SDEs). Where several declare the same, a built-in
            wins, else the first registered.
        install_hint: how to install what the backend needs (``pip install ...``), added to the
            error when it cannot be constructed.
        distributed: module path of its data-parallel helpers for :mod:`regnde.distributed`
            (``all_reduce_sum_max``, ``setup``, optionally ``data_parallel``, ``make_mesh``,
            ``shard_batch``), or ``None``.
        dropin_hint: for a backend without a drop-in (a ``regularize`` method, which
            :func:`regnde.regularize` uses): how to regularize unchanged code of its library
            instead, said when no installed backend has a drop-in.
    """

    name: ClassVar[str]
    framework: ClassVar[str]
    sensitivities: ClassVar[tuple[str, ...]] = SENSITIVITIES
    runs_tableaus: ClassVar[bool] = True
    sde: ClassVar[bool] = False
    default_method: ClassVar[str | None] = "dopri5"
    augments: ClassVar[bool] = False
    per_sample_steps: ClassVar[bool] = False
    #: ``(rtol, atol)`` when the user passes ``None``: the same on every backend, so that
    #: switching backends never changes the accuracy asked for.
    ode_tolerances: ClassVar[tuple[float, float]] = (1e-6, 1e-6)
    #: for SDEs: torchsde's own defaults, which adaptive step doubling can meet.
    sde_tolerances: ClassVar[tuple[float, float]] = (1e-5, 1e-4)
    default_for: ClassVar[tuple[str, ...]] = ()
    install_hint: ClassVar[str] = ""
    distributed: ClassVar[str | None] = None
    dropin_hint: ClassVar[str] = ""

    @abstractmethod
    def native_methods(self) -> Mapping[str, Tableau | None]:
        """Adaptive methods the backend implements itself, canonical name -> tableau (or
        ``None`` where it has no Runge–Kutta tableau)."""

    def aliases(self) -> Mapping[str, str]:
        """Other accepted names, alias -> canonical name."""
        return {}

    def sde_methods(self) -> Mapping[str, Tableau | None] | None:
        """For a backend that solves ODEs and SDEs with different methods: its SDE methods
        (name -> ``None``; ``method=None`` then lets the backend choose by ``sde_type``).
        ``None`` (the default): :meth:`native_methods` serve SDEs too, as on torchsde."""
        return None

    @abstractmethod
    def owns(self, y0: Any) -> bool:
        """Whether ``y0`` is an array of this backend's framework."""

    @abstractmethod
    def solve(self, request: SolveRequest) -> Solution:
        """Solve with recording; evaluate ``request.regularizer`` if given."""

    @abstractmethod
    def step(self, request: StepRequest) -> StepResult:
        """One step from ``(t, y)``; ``dt=None`` uses the backend's initial step selection."""

    @abstractmethod
    def make_key(self, key: Any) -> Key:
        """Turn a user's ``key`` (int seed, generator, PRNG key or ``None``) into a :class:`Key`."""
