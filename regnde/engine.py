"""The order of a regularized solve, written once for every backend.

A backend adapter runs its library's solver and records it; everything around that run lives
here, and every adapter (``regnde/adapters``: ODE and SDE solves, and the drop-in recorders)
calls it in the same order::

    plan = Plan(regularizer, key, t0, t1, trace)      # 1. before solving
    ...                                                # 2. the adapter solves, recording
    run = <the adapter's Run>                          # 3. the finished solve
    value, nfe_reg = regularize(plan, run, count)      # 4. the regularizer, counted, checked
    return solution(ys, trace, stats, value)           # 5. what regnde.solve returns

1. :class:`Plan` draws the times the regularizer can sample before the solve
   (``regularizer.presample``: samplers that need no trace, e.g. ``Unbiased``) and says what
   the recording must keep: :attr:`Plan.probes`, the times at which to capture the solver's own
   dense output (``{id(tau): tau}``; :meth:`Plan.captured` maps the captured values back), and
   :attr:`Plan.keep_states`, whether states at step starts are recorded.
2. The adapter runs its library's solver with recording (see below).
3. It builds its :class:`regnde.backend.Run` from the recording.
4. :func:`regularize` evaluates the regularizer on the Run with the plan's key and presampled
   times, counts the vector-field evaluations it spent (``nfe_reg``) and, when values are
   concrete, raises :class:`regnde.NonFiniteError` for a NaN/Inf value (:func:`check_value`;
   a compiled adapter calls it again once out of compiled code, and adds its own runtime error
   inside, e.g. ``equinox.error_if`` under ``jax.jit``).
5. :func:`solution` packs the :class:`regnde.Solution`.

What an adapter supplies (the rest of :class:`regnde.backend.Backend` is class data:
``framework``, ``sde``, ``sensitivities``, ``augments``, ``runs_tableaus``, tolerances):

- a key: :meth:`Backend.make_key` turns the user's ``key`` into a :class:`regnde.backend.Key`
  (``uniform``, ``normal``, ``rademacher``, ``fold``); the plan passes it to the regularizer;
- the recorded solve: for every accepted step its start ``t``, signed ``dt`` (the last one
  clipped to ``t1``), the scaled ``error`` the controller compared with 1, the stiffness
  estimate from the stage values where the method has a stiffness pair, the state at the step
  start when :attr:`Plan.keep_states`, and the dense output at every time in
  :attr:`Plan.probes` that the step covers; counts of evaluations and rejected steps (a
  :class:`regnde.Trace` and :class:`regnde.Stats`);
- a :class:`regnde.backend.Run` over it: ``state_at`` (the captured probes, else from the
  trace), ``step`` (one step of the solve's method, tolerances and field), ``initial_dt`` and,
  on backends that augment the state, ``integral``;
- a way to count the evaluations the Run spends: a zero-argument ``count()`` returning a
  running total, or a Run with its own ``nfe`` attribute.

Nothing here imports torch or jax: it works on the backend's arrays through their own
operators and :mod:`array_api_compat`, on traced JAX values too (:func:`check_value` only
looks at concrete values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from array_api_compat import array_namespace

from regnde.errors import NonFiniteError, non_finite_regularizer
from regnde.trace import Array, Solution, Stats, Trace
from regnde.validate import is_concrete

__all__ = ["Plan", "check_value", "keeps_states", "regularize", "solution", "where_non_finite"]


def keeps_states(regularizer: Any, trace: str, replays: bool = False) -> bool:
    """Whether the recording keeps the state at every step start: with ``trace="full"``, or
    when the regularizer samples states at times the solve did not announce (a sampler that
    needs the trace) and the backend cannot recompute them from the trace (``replays``)."""
    if trace == "full":
        return True
    return regularizer is not None and not replays and bool(regularizer.needs_states())


class Plan:
    """What a regularized solve must do before and while solving.

    Args:
        regularizer: the :class:`regnde.regularizers.Regularizer`, or ``None`` (an empty plan).
        key: the backend's :class:`regnde.backend.Key`.
        t0, t1: start and end time of the solve (scalars of the backend, the user's direction;
            JAX tracers too).
        trace: ``"full"`` or ``"summary"``.
        replays: whether the backend's Run recomputes states at step starts from the trace
            (so :attr:`keep_states` is needed for ``trace="full"`` only).

    Attributes:
        presampled: times drawn before the solve, by term (``regularizer.presample``).
        probes: ``{id(tau): tau}`` for every presampled ``tau``: where the recording captures
            the solver's dense output, for ``Run.state_at(tau)``.
        keep_states: whether the recording keeps states at step starts (:func:`keeps_states`).
    """

    def __init__(self, regularizer: Any, key: Any, t0: Array, t1: Array, trace: str = "full",
                 *, replays: bool = False):
        self.regularizer, self.key, self.trace = regularizer, key, trace
        self.t0, self.t1 = t0, t1
        self.presampled: dict[Any, Array] = (
            {} if regularizer is None else regularizer.presample(t0, t1, key))
        self.probes: dict[int, Array] = {id(v): v for v in self.presampled.values()}
        self.keep_states = keeps_states(regularizer, trace, replays)

    def probe_times(self) -> list[Array]:
        """The probe times in a fixed order (the order :meth:`captured` expects)."""
        return list(self.probes.values())

    def probes_as(self, convert: Callable[[Array], Array]) -> dict[int, Array]:
        """:attr:`probes` with every time converted (e.g. to the solver's time direction)."""
        return {pid: convert(tau) for pid, tau in self.probes.items()}

    def captured(self, values: Sequence[Array]) -> dict[int, Array]:
        """``{id(tau): value}`` from values captured in :meth:`probe_times` order (e.g. the
        rows of a stacked array)."""
        return {pid: values[i] for i, pid in enumerate(self.probes)}


def regularize(plan: Plan, run: Any, count: Callable[[], Any] | None = None
               ) -> tuple[Array, Any]:
    """The regularizer's value on a finished solve and the evaluations it spent.

    Args:
        plan: the solve's :class:`Plan`.
        run: the adapter's :class:`regnde.backend.Run`.
        count: a zero-argument callable returning the running count of vector-field
            evaluations (read before and after); ``None``: the Run's own ``nfe`` attribute.

    Returns:
        ``(value, nfe_reg)``: the differentiable scalar (``None`` without a regularizer) and the
        evaluations spent on it (an int, or an array of the backend under ``jax.jit``).

    Raises:
        NonFiniteError: the value is NaN or Inf (concrete values only; :func:`check_value`).
    """
    reg = plan.regularizer
    if reg is None:
        return None, 0

    def counted() -> Any:
        return count() if count is not None else run.nfe

    before = counted()
    value = reg.value(run, plan.key, plan.presampled)
    nfe_reg = counted() - before
    check_value(value, reg, run.trace)
    return value, nfe_reg


def check_value(value: Array | None, regularizer: Any, trace: Trace | None,
                traced: bool = False) -> None:
    """Raise :class:`regnde.NonFiniteError` if ``value`` is NaN or Inf, naming the first
    accepted step of ``trace`` with non-finite estimates. Nothing to check for ``None``, for
    values unknown at trace time, or with ``traced`` (a transformation is running)."""
    if value is None or traced or not is_concrete(value):
        return
    xp = array_namespace(value)
    if not bool(xp.all(xp.isfinite(value))):
        raise NonFiniteError(non_finite_regularizer(repr(regularizer), where_non_finite(trace)))


def where_non_finite(trace: Trace | None) -> str:
    """Where the first non-finite ``error`` or ``stiffness`` of the real entries is."""
    if trace is None:
        return "in the regularizer's extra step"
    xp = array_namespace(trace.error)
    bad = ~xp.isfinite(trace.error)
    if trace.stiffness is not None:
        bad = bad | ~xp.isfinite(trace.stiffness)
    bad = bad & trace.mask
    if bool(xp.any(bad)):
        if bad.ndim == 2:  # per-sample trace
            b = int(xp.argmax(xp.astype(xp.any(bad, axis=-1), xp.int32)))
            j = int(xp.argmax(xp.astype(bad[b], xp.int32)))
            return f"first at accepted step {j} of sample {b}, t={float(trace.t[b, j]):.6g}"
        j = int(xp.argmax(xp.astype(bad, xp.int32)))
        return f"first at accepted step {j}, t={float(trace.t[j]):.6g}"
    return "in the regularizer's extra step"


def solution(ys: Array, trace: Trace | None, stats: Stats, value: Array | None,
             **extras: Any) -> Solution:
    """The :class:`regnde.Solution`; ``extras`` become further attributes (e.g. the
    ``logqp`` of an SDE solve)."""
    sol = Solution(ys=ys, reg=value, stats=stats, trace=trace)
    for name, x in extras.items():
        setattr(sol, name, x)
    return sol

