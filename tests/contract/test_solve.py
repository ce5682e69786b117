"""Checks 2-4: a solve's outputs and trace are consistent and accurate, forwards and backwards
in time, and a step limit raises :class:`regnde.MaxStepsExceeded`."""

from __future__ import annotations

import numpy as np
import pytest

import regnde

from .problem import ATOL, PARAMS, RTOL, Y0, T, backend, reference

TOL = 100 * RTOL  # the solution to within 100 * rtol of the reference


def _solve(case, fw, y0, t, **kw):
    f = fw.field({k: fw.asarray(v) for k, v in PARAMS.items()})
    kw = {"rtol": RTOL, "atol": ATOL, **kw}
    return regnde.solve(f, fw.asarray(y0), fw.asarray(t), backend=case.backend,
                        method=case.method, **kw)


def check_steps(ts, dt, err, t):
    """One sequence of accepted steps (real entries only) covers ``t[0]..t[-1]``: contiguous,
    in ``t``'s direction, each with a scaled error in ``[0, 1]``."""
    direction = np.sign(t[-1] - t[0])
    assert ts[0] == t[0]
    assert np.all(np.diff(ts) * direction > 0), f"trace.t not monotonic: {ts}"
    assert np.all(dt * direction > 0)
    np.testing.assert_allclose(ts[1:], ts[:-1] + dt[:-1], rtol=0, atol=1e-12,
                               err_msg="steps are not contiguous")
    assert abs(dt.sum() - (t[-1] - t[0])) <= 1e-10, (dt.sum(), t[-1] - t[0])
    assert np.all(np.isfinite(err)) and np.all(err >= 0)
    assert np.all(err <= 1.0), f"accepted steps with a scaled error above 1: {err.max()}"


def check_trace(case, fw, sol, t, y0_shape):
    """The trace of ``sol`` (a solve over ``t``, either direction) is self-consistent. A backend
    with :attr:`~regnde.backend.Backend.per_sample_steps` records the per-sample form
    (``(batch, N)`` fields, ``(batch,)`` counts): each sample's row obeys the rules of a
    whole-batch ``(N,)`` trace. Returns the real entries ``[(t, dt, error), ...]`` as numpy, one
    per row (one in all without per-sample steps)."""
    tr = sol.trace
    assert tr is not None, "a solve returns its Trace"
    per_sample = backend(case).per_sample_steps
    lead = tuple(y0_shape[:1]) if per_sample else ()
    ts, dt, mask, err = (fw.to_numpy(x) for x in (tr.t, tr.dt, tr.mask, tr.error))
    assert ts.ndim == len(lead) + 1, (
        f"trace.t has shape {ts.shape}; per_sample_steps={per_sample} means "
        f"{'(batch, N)' if per_sample else '(N,)'}")
    shape = (*lead, ts.shape[-1])
    assert ts.shape == dt.shape == mask.shape == err.shape == shape
    assert mask.dtype == np.bool_
    n = np.asarray(fw.to_numpy(tr.n_steps))
    assert n.shape == lead, f"trace.n_steps has shape {n.shape}, expected {lead}"
    np.testing.assert_array_equal(n, mask.sum(-1), err_msg="n_steps != mask count")
    assert np.all(n >= 1)
    stats = sol.stats
    for name in ("n_steps", "n_rejected"):
        assert np.shape(fw.to_numpy(getattr(stats, name))) == lead, f"stats.{name}"
    np.testing.assert_array_equal(fw.to_numpy(stats.n_steps), n,
                                  err_msg="stats.n_steps != trace.n_steps")
    assert np.all(fw.to_numpy(stats.n_rejected) >= 0)
    assert int(fw.to_numpy(stats.nfe)) > 0
    for name in ("stiffness", "dt_taken"):
        x = getattr(tr, name)
        assert x is None or fw.to_numpy(x).shape == shape, name
    if tr.y is not None:
        state = tuple(y0_shape[1:]) if per_sample else tuple(y0_shape)
        assert fw.to_numpy(tr.y).shape == (*shape, *state)
    rows = [(ts[b][mask[b]], dt[b][mask[b]], err[b][mask[b]]) for b in range(lead[0])
            ] if per_sample else [(ts[mask], dt[mask], err[mask])]
    for row in rows:
        check_steps(*row, t)
    return rows


def check_ys(fw, sol, y0, ref):
    ys = fw.to_numpy(sol.ys)
    assert ys.shape == ref.shape
    np.testing.assert_array_equal(ys[0], y0)
    scale = np.maximum(np.abs(ref), 1.0)
    worst = float(np.max(np.abs(ys - ref) / scale))
    assert worst <= TOL, f"max |ys - ref| / max(|ref|, 1) = {worst:.3g} > {TOL:g}"


def test_solve_trace_and_accuracy(case, fw):
    """Check 2: trace fields consistent; ys[0] == y0; ys within 100 rtol of DOP853."""
    sol = _solve(case, fw, Y0, T)
    check_trace(case, fw, sol, T, Y0.shape)
    check_ys(fw, sol, Y0, reference(Y0, T))


def test_reverse_time(case, fw):
    """Check 3: a decreasing ``t`` solves backwards; from the forward solution's end it returns
    the forward solution reversed (both within 100 rtol of DOP853)."""
    fwd = _solve(case, fw, Y0, T)
    y_end = fw.to_numpy(fwd.ys)[-1]
    back_t = T[::-1].copy()
    sol = _solve(case, fw, y_end, back_t)
    check_trace(case, fw, sol, back_t, Y0.shape)
    check_ys(fw, sol, y_end, reference(y_end, back_t))
    ys = fw.to_numpy(sol.ys)[::-1]
    worst = float(np.max(np.abs(ys - fw.to_numpy(fwd.ys)) / np.maximum(np.abs(ys), 1.0)))
    assert worst <= TOL, f"backward solve differs from the forward one by {worst:.3g}"


def test_max_steps(backend_case, fw):
    """Check 4: more steps than ``max_steps`` raise :class:`regnde.MaxStepsExceeded`, saying
    which limit was hit and what to do."""
    with pytest.raises(regnde.MaxStepsExceeded, match=r"max_steps=2\b") as info:
        _solve(backend_case, fw, Y0, T, max_steps=2)
    assert "max_steps" in str(info.value) and "raise" in str(info.value)
