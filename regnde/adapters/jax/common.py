"""What the diffrax backend (:mod:`.diffrax`, ODEs and SDEs, with its helpers :mod:`.run`,
:mod:`.ode_methods`, :mod:`.sde_methods`, :mod:`.sde_terms`) and the drop-in
(:mod:`.diffrax_dropin`) build on: JAX keys, the recording solver, the scaled error and the
stiffness estimate, input checks and the failure reports. It imports no other adapter module,
so the adapters' import graph stays acyclic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx

from regnde.errors import (
    MaxStepsExceeded,
    NonFiniteError,
    SolverError,
    max_steps_exceeded,
    max_steps_exceeded_compiled,
    non_finite_f,
    trace_capacity_exceeded,
)
from regnde.tableau import Tableau
from regnde.validate import is_concrete

#: ``PIDController`` fields accepted as options (passed through unchanged).
CONTROLLER_OPTIONS = ("pcoeff", "icoeff", "dcoeff", "dtmin", "dtmax", "force_dtmin",
                      "factormin", "factormax", "safety", "norm", "step_ts", "jump_ts")


# -- the error and the stiffness estimate ---------------------------------------------------------
def scaled_error(y0: Any, y1: Any, y_error: Any, rtol: Any, atol: Any,
                 norm: Callable[[Any], Any] = optx.rms_norm) -> jax.Array:
    """The number diffrax's ``PIDController`` compares with 1 (pid.py ``_scale``):
    ``norm(y_error / (atol + rtol * max(|y0|, |y1|)))``, ``norm`` RMS by default."""

    def _scale(_y0: Any, _y1: Any, _err: Any) -> Any:
        _y1 = jnp.where(jnp.isnan(_y1).any(), _y0, _y1)
        _y = jnp.maximum(jnp.abs(_y0), jnp.abs(_y1))
        with jax.numpy_dtype_promotion("standard"):
            return _err / (atol + _y * rtol)

    return norm(jtu.tree_map(_scale, y0, y1, y_error))


def stiffness(k: jax.Array, dt: Any, tab: Tableau) -> jax.Array | None:
    """Shampine's ``|f_p - f_q| / |Y_p - Y_q|`` from stages ``k`` (``(stages, *y.shape)``:
    vector-field values ``f_i``, or ``f_i`` times any common factor such as diffrax's ``dt``,
    which cancels) of a step of length ``dt``: ``Y_p - Y_q = dt * sum_j w_j f_j``."""
    w = tab.stage_difference_weights()
    if w is None or tab.stiffness_pair is None:
        return None
    p, q = tab.stiffness_pair
    num = jnp.linalg.norm(jnp.ravel(k[p] - k[q]))
    wk = jnp.tensordot(jnp.asarray(w[: k.shape[0]], dtype=k.dtype), k[: len(w)], axes=1)
    den = jnp.linalg.norm(jnp.ravel(wk)) * jnp.abs(dt).astype(k.dtype)
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# -- randomness ---------------------------------------------------------------------------------
class JaxKey:
    """A :class:`regnde.backend.Key` over JAX PRNG keys.

    Args:
        key: a typed PRNG key, or ``None`` (eager only: a fresh key from NumPy's entropy).
        traced: whether the solve runs under a JAX transformation (then ``None`` is an error).
    """

    def __init__(self, key: Any = None, traced: bool = False, path: tuple[int, ...] = ()):
        self.key, self.traced, self.path = key, traced, path

    def _key(self) -> Any:
        if self.key is None:
            if self.traced:
                raise ValueError(
                    "key=None under jax.jit (or another JAX transformation): a sampler needs "
                    "randomness and JAX has no global generator. Pass key=<int seed> or a "
                    "jax.random.key(...) to regnde.solve."
                )
            key = jax.random.key(int(np.random.SeedSequence().generate_state(1)[0]))
            for i in self.path:
                key = jax.random.fold_in(key, i)
            self.key = key
        return self.key

    def uniform(self, like: Any) -> jax.Array:
        return jax.random.uniform(self._key(), (), dtype=jnp.result_type(like))

    def normal(self, like: Any) -> jax.Array:
        """Standard normal noise shaped like ``like`` (same key, same noise)."""
        k = jax.random.fold_in(self._key(), 1)
        return jax.random.normal(k, jnp.shape(like), dtype=jnp.result_type(like))

    def rademacher(self, like: Any) -> jax.Array:
        """``+-1`` noise shaped like ``like`` (same key, same noise)."""
        k = jax.random.fold_in(self._key(), 2)
        return jax.random.rademacher(k, jnp.shape(like), dtype=jnp.result_type(like))

    def fold(self, index: int) -> JaxKey:
        if self.key is None:  # stay lazy: an error only if a sampler draws from it
            return JaxKey(None, self.traced, (*self.path, index))
        return JaxKey(jax.random.fold_in(self.key, index), self.traced)

    def __repr__(self) -> str:
        return f"JaxKey({self.key!r})"


def make_key(key: Any, traced: bool = False) -> JaxKey:
    """A :class:`JaxKey` from an int seed, a JAX PRNG key (typed, or raw ``uint32[2]``), an
    integer JAX scalar, or ``None``."""
    if isinstance(key, JaxKey):
        return key
    if key is None:
        return JaxKey(None, traced)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return JaxKey(jax.random.key(int(key)), traced)
    if isinstance(key, jax.Array):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            return JaxKey(key, traced)
        if key.dtype == jnp.uint32 and key.shape == (2,):
            return JaxKey(jax.random.wrap_key_data(key), traced)
        if jnp.issubdtype(key.dtype, jnp.integer) and key.shape == ():
            return JaxKey(jax.random.key(key), traced)
    raise ValueError(
        f"key must be an int seed, a JAX PRNG key (jax.random.key(...)) or None on the "
        f"diffrax backend, got {type(key).__module__}.{type(key).__name__}: {key!r}."
    )


# -- recording ----------------------------------------------------------------------------------
class ForwardingSolver(dfx.AbstractAdaptiveSolver, dfx.AbstractWrappedSolver):
    """A wrapper whose steps are its ``solver``'s: everything but ``init``/``step`` is
    forwarded (shared by regnde's recording solver and the drop-in's wrapper)."""

    @property
    def term_structure(self) -> Any:  # type: ignore[override]
        return self.solver.term_structure

    @property
    def interpolation_cls(self) -> Any:  # type: ignore[override]
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self) -> Any:  # type: ignore[override]
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms: Any) -> Any:
        return self.solver.order(terms)

    def error_order(self, terms: Any) -> Any:
        return self.solver.error_order(terms)

    def func(self, terms: Any, t0: Any, y0: Any, args: Any) -> Any:
        return self.solver.func(terms, t0, y0, args)


class RecordingSolver(ForwardingSolver):
    """Wraps a diffrax RK solver; records each step in its solver state.

    The solver state is ``(inner_state, record)``; ``record`` holds ``n`` (accepted steps so
    far), ``t``, ``dt``, ``error`` and optionally ``stiffness`` of shape ``(capacity,)`` in
    solver time, and ``probes``: the dense-output state at each time in ``probe_ts``
    ``(P, *y.shape)``. Steps, errors and dense output are the wrapped solver's own.
    """

    solver: dfx.AbstractAdaptiveSolver  # type: ignore[misc]
    tab: Tableau | None = eqx.field(static=True)  # None: no stiffness (SDE step doubling)
    capacity: int = eqx.field(static=True)
    rtol: Any
    atol: Any
    norm: Callable[[Any], Any] = eqx.field(static=True)
    probe_ts: jax.Array | None = None
    #: the user's state ``y`` within the solver's state (``(y, r)`` of an augmented solve):
    #: errors, stiffness and probes look at ``y`` only.
    part: Callable[[Any], Any] = eqx.field(static=True, default=lambda y: y)
    #: eager solves note the first trial step with non-finite values (the controller rejects
    #: it, and the state rolls back), so that a solve that then runs out of steps can say why
    watch: bool = eqx.field(static=True, default=False)

    def init(self, terms: Any, t0: Any, t1: Any, y0: jax.Array, args: Any) -> Any:
        inner = self.solver.init(terms, t0, t1, y0, args)
        cap = self.capacity
        tdt = jnp.result_type(t0, t1)
        edt = jnp.result_type(y0)
        record = {
            "n": jnp.asarray(0, dtype=jnp.int32),
            "t": jnp.zeros(cap, tdt), "dt": jnp.zeros(cap, tdt), "error": jnp.zeros(cap, edt),
        }
        if self.tab is not None and self.tab.stiffness_pair is not None:
            record["stiffness"] = jnp.zeros(cap, edt)
        if self.probe_ts is not None:
            y = self.part(y0)
            record["probes"] = jnp.zeros((self.probe_ts.shape[0], *y.shape), y.dtype)
        return inner, record

    def step(self, terms: Any, t0: Any, t1: Any, y0: Any, args: Any, solver_state: Any,
             made_jump: Any) -> Any:
        inner, record = solver_state
        y1, y_error, dense, inner, result = self.solver.step(terms, t0, t1, y0, args, inner,
                                                             made_jump)
        if self.watch:
            bad = ~(jnp.all(jnp.isfinite(self.part(y1)))
                    & jnp.all(jnp.isfinite(self.part(y_error))))
            jax.lax.cond(bad, lambda: jax.debug.callback(_NONFINITE.note, t0),
                         lambda: None)
        i = record["n"]
        new = dict(record)
        new["n"] = i + 1
        new["t"] = record["t"].at[i].set(t0)
        new["dt"] = record["dt"].at[i].set(t1 - t0)
        part = self.part
        err = scaled_error(part(y0), part(y1), part(y_error), self.rtol, self.atol, self.norm)
        new["error"] = record["error"].at[i].set(err.astype(record["error"].dtype))
        if "stiffness" in record and self.tab is not None:
            s: Any = stiffness(part(dense["k"])[: self.tab.stages], t1 - t0, self.tab)
            new["stiffness"] = record["stiffness"].at[i].set(s.astype(record["error"].dtype))
        probe_ts = self.probe_ts
        if probe_ts is not None:
            inside = (probe_ts >= t0) & (probe_ts <= t1)

            def interpolate() -> Any:
                interp = self.solver.interpolation_cls(t0=t0, t1=t1, **dense)
                vals = part(jax.vmap(interp.evaluate)(probe_ts))
                mask = inside.reshape((-1,) + (1,) * (vals.ndim - 1))
                return jnp.where(mask, vals.astype(part(y0).dtype), record["probes"])

            new["probes"] = jax.lax.cond(jnp.any(inside), interpolate,
                                         lambda: record["probes"])
        return y1, y_error, dense, (inner, new), result


class _VectorField(eqx.Module):
    """regnde's ``f(t, y)`` as diffrax's ``f(t, y, args)``."""

    f: Callable[..., Any]

    def __call__(self, t: Any, y: Any, args: Any) -> Any:
        return self.f(t, y)


def _stop(tree: Any) -> Any:
    return jtu.tree_map(lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, tree)


# -- checks and failures ------------------------------------------------------------------------
def _check_f(f: Any, t0: Any, y0: jax.Array) -> None:
    if not callable(f):
        raise ValueError(f"f must be a callable f(t, y) returning dy/dt, got {f!r}.")
    try:
        out = jax.eval_shape(f, t0, y0)
    except Exception as exc:
        raise ValueError(
            f"calling f(t, y) with t of dtype {jnp.result_type(t0)} and y of shape "
            f"{tuple(y0.shape)}, dtype {y0.dtype} failed: {type(exc).__name__}: {exc}. "
            f"f must take (t, y) (regnde's signature, not diffrax's (t, y, args))."
        ) from exc
    if not hasattr(out, "shape") or out.shape != y0.shape or out.dtype != y0.dtype:
        got = (f"shape {tuple(out.shape)}, dtype {out.dtype}" if hasattr(out, "shape")
               else repr(out))
        raise ValueError(
            f"f(t, y) must return an array of y0's shape {tuple(y0.shape)} and dtype "
            f"{y0.dtype}, got {got}. Mixed dtypes are not supported: cast the parameters of f "
            f"or y0 so that they agree."
        )


def _check_y(y: Any, what: str) -> None:
    if not isinstance(y, jax.Array):
        raise ValueError(f"{what} must be a JAX array on the diffrax backend, got {type(y)}.")
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise ValueError(
            f"{what} must be a real floating-point array, got dtype {y.dtype}; use "
            f"{what}.astype(jnp.float32) (or float64 with jax_enable_x64)."
        )


def _traced(*xs: Any) -> bool:
    """Whether a JAX transformation (jit, grad, vmap, ...) is running or any of ``xs`` is
    traced; a vector field may close over traced parameters, so the trace state decides."""
    try:
        from jax._src.core import trace_state_clean

        if not trace_state_clean():
            return True
    except ImportError:  # pragma: no cover - older/newer JAX without it
        pass
    return any(not is_concrete(x) for x in jtu.tree_leaves(xs) if isinstance(x, jax.Array))


class _FirstNonFinite:
    """The time of the first trial step with non-finite values in the current eager solve
    (set from compiled code by ``jax.debug.callback``)."""

    def __init__(self) -> None:
        self.t: float | None = None
        self._lock = threading.Lock()

    def note(self, t: Any) -> None:
        with self._lock:
            if self.t is None:
                self.t = float(t)

    def take(self) -> float | None:
        with self._lock:
            t, self.t = self.t, None
        return t


_NONFINITE = _FirstNonFinite()


def _check_result_eager(out: dict[str, Any], st: Any) -> None:
    """Raise regnde's own errors for a failed eager solve (``st``: its static part, with
    ``capacity``, ``max_steps``, ``rtol`` and ``atol``)."""
    fail = out.pop("failure")
    result, n = fail["result"], int(fail["n"])
    jax.effects_barrier()  # the debug callbacks of the watching rerun have run
    bad_t = _NONFINITE.take()
    if bool(result != dfx.RESULTS.successful) and bad_t is not None:
        raise NonFiniteError(non_finite_f(float(fail["direction"]) * bad_t))
    if bool(result == dfx.RESULTS.max_steps_reached):
        m = min(n, st.capacity)
        reached = (float(fail["direction"] * (fail["t"][m - 1] + fail["dt"][m - 1]))
                   if m else float("nan"))
        raise MaxStepsExceeded(max_steps_exceeded(st.max_steps, reached, float(fail["t1"]),
                                                  st.rtol, st.atol))
    if bool(result != dfx.RESULTS.successful):
        raise SolverError(f"diffrax's solve failed: {result}.")
    if n > st.capacity:
        raise SolverError(trace_capacity_exceeded(st.capacity, n))


def _attach_errors(ys: Any, result: Any, record: dict[str, Any], max_steps: int,
                   capacity: int) -> Any:
    """Equinox runtime errors (under jit) for failed solves."""
    too_many = result == dfx.RESULTS.max_steps_reached
    failed = result != dfx.RESULTS.successful
    ys = eqx.error_if(ys, too_many, max_steps_exceeded_compiled(max_steps))
    ys = eqx.error_if(ys, failed & ~too_many, "regnde: diffrax's solve failed (see its result).")
    return eqx.error_if(ys, record["n"] > capacity, trace_capacity_exceeded(capacity, None))
