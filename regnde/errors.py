"""Exceptions and the messages users read. Each message lives here once."""

from __future__ import annotations

from collections.abc import Iterable


class SolverError(RuntimeError):
    """A solve could not finish (step-size underflow, step limit, non-finite values)."""


class MaxStepsExceeded(SolverError):
    """More solver steps (accepted and rejected) than ``max_steps``."""


class StepSizeUnderflow(SolverError):
    """The step size fell below what the time variable can resolve."""


class NonFiniteError(SolverError, FloatingPointError):
    """The vector field, the state or a regularizer produced NaN or Inf."""


class TaylorModeError(RuntimeError):
    """An operation that Taylor mode cannot trace (torch: in place, or failing under nested
    jvp; JAX: a primitive ``jax.experimental.jet`` has no rule for). The message names it."""


class PluginError(RuntimeError):
    """Something provided by a plugin could not be used; the message names the plugin."""


def choices(kind: str, given: object, valid: Iterable[str], hint: str = "") -> str:
    """``unknown KIND 'x'; valid: a, b, c. HINT``"""
    listed = ", ".join(sorted(valid)) or "(none)"
    msg = f"unknown {kind} {given!r}; valid: {listed}."
    return f"{msg} {hint}".rstrip()


def plugin_unavailable(kind: str, name: str, culprits: dict[str, str], hint: str) -> str:
    why = "; ".join(f"plugin {p!r} {cause}" for p, cause in sorted(culprits.items()))
    return (f"{kind} {name!r} is not available: {why}. {hint or 'Install what it needs.'}"
            ).strip()


def max_steps_exceeded(max_steps: int, t: float, t_end: float, rtol: object = None,
                       atol: object = None) -> str:
    tols = "" if rtol is None else f" at rtol={float(rtol):g}, atol={float(atol):g}"  # type: ignore[arg-type]
    return (
        f"the solver used more than max_steps={max_steps} steps (accepted and rejected){tols} "
        f"and reached t={t:.6g} of t_end={t_end:.6g}; the problem may be stiff or the "
        f"tolerances too tight: raise max_steps, loosen rtol/atol, or regularize the model."
    )


def vector_field_output(what: str, got: object, want: object) -> str:
    return (
        f"the vector field returned {what} {got} but the state has {what} {want}; f(t, y) must "
        f"return dy/dt with the shape and dtype of y."
    )


def underflow(t: float, dt: float) -> str:
    return (
        f"step size underflow at t={t:.6g} (dt={dt:.3g}): the solver cannot make progress. "
        f"The vector field may be non-finite or discontinuous there; check f, loosen rtol/atol, "
        f"or use a stiff solver outside regnde."
    )


def non_finite_f(t: float) -> str:
    return (
        f"the vector field returned NaN or Inf at t={t:.6g}; regnde stops instead of "
        f"shrinking the step forever. Check f for overflow or division by zero."
    )


def non_finite_y0() -> str:
    return "y0 contains NaN or Inf; pass finite initial values."


def non_finite_regularizer(name: str, where: str) -> str:
    return (
        f"regularizer {name} is NaN or Inf ({where}); the solve or the sampled step produced "
        f"non-finite values. Check f and the tolerances."
    )


def max_steps_exceeded_compiled(max_steps: int) -> str:
    """The same as :func:`max_steps_exceeded`, for compiled code (no values to report)."""
    return (
        f"regnde: the solver used more than max_steps={max_steps} steps (accepted and "
        f"rejected) before reaching the end time; the problem may be stiff or the tolerances "
        f"too tight: raise max_steps, loosen rtol/atol, or regularize the model."
    )


def trace_capacity_exceeded(capacity: int, n: int | None) -> str:
    got = "more" if n is None else str(n)
    return (
        f"regnde: the solve accepted {got} steps but trace_capacity={capacity} holds fewer; "
        f"raise trace_capacity (at most max_steps) or leave it at its default (max_steps)."
    )


def batch_not_divisible(batch_size: int, world_size: int, unit: str = "processes") -> str:
    lo = batch_size // world_size * world_size
    near = [n for n in (lo, lo + world_size) if n > 0]
    fix = (f"launch a number of processes that divides {batch_size}" if unit == "processes"
           else f"use a number of {unit} that divides {batch_size}")
    return (
        f"batch size {batch_size} is not divisible by the world size {world_size} ({unit}): "
        f"every rank needs an equal shard for data-parallel gradients to be the mean over the "
        f"batch. Use a batch size that is a multiple of {world_size} (e.g. "
        f"{' or '.join(map(str, near))}) or {fix}."
    )


# -- the drop-in (``regnde.regularize``): what it cannot regularize, said once per block --------
def dropin_not_regularized(what: str) -> str:
    return (
        f"regnde.regularize: {what}; that call is not regularized (its output is unchanged). "
        f"reg.value counts only the solves that could be regularized (0 if none)."
    )


def dropin_fixed_step(method: str) -> str:
    return dropin_not_regularized(
        f"method {method!r} takes fixed steps and has no error estimate to regularize; use an "
        f"adaptive method (dopri5, tsit5, bosh3, ...) to regularize it"
    )


def dropin_no_solve(host: str) -> str:
    return (
        f"regnde.regularize: no {host} solve ran inside the block, so reg.value is 0. Call "
        f"the solver inside the `with` block, on the same thread."
    )


def dropin_other_thread(host: str) -> str:
    return dropin_not_regularized(
        f"a {host} solve ran on a thread with no open block while a block is open on another "
        f"thread (blocks are per thread); open regnde.regularize on the thread that solves"
    )
