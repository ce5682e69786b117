"""Checks 5, 6 and 8: sampling keys are deterministic, regularizer gradients equal central
finite differences of a fixed-grid replay (``regnde.step`` over the recorded steps), and a
local regularizer with the unbiased sampler runs (finite value, its own evaluations counted).

The replay: with ``sensitivity="direct"`` step sizes are constants for autodiff, so a
regularizer's gradient is that of the same arithmetic on the recorded grid (``trace.t``,
``trace.dt``, ``trace.dt_taken`` for the step actually taken), which is what the replay
computes with public ``regnde.step`` calls (RESEARCH.md, "Gradients and tests")."""

from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np
import pytest

import regnde
from regnde.regularizers import GlobalError, LocalError

from .frameworks import PARAM_NAMES
from .problem import PARAMS, RTOL, Y0, T, backend, require

GTOL = 1e-4  # looser tolerances: fewer steps to replay
H = 1e-4  # finite-difference step along a unit direction
GRAD_RTOL = 1e-5  # |g.v - fd| <= GRAD_RTOL * |g| for unit v


@functools.cache
def local_unbiased() -> LocalError:
    """One instance for all solves, so that compiled backends compile its solve once."""
    return LocalError(sampler="unbiased")


def _f(fw, flat_params):
    return fw.field({k: fw.asarray(v) for k, v in unflatten(flat_params).items()})


def flatten(params):
    return np.concatenate([np.ravel(params[k]) for k in PARAM_NAMES])


def unflatten(flat):
    """Parameter arrays from one flat vector (numpy, or the framework's while differentiating).
    """
    out, i = {}, 0
    for k in PARAM_NAMES:
        n = PARAMS[k].size
        out[k] = flat[i:i + n].reshape(PARAMS[k].shape)
        i += n
    return out


def _solve_value(case, fw, key, reg):
    f = fw.field({k: fw.asarray(v) for k, v in PARAMS.items()})
    sol = regnde.solve(f, fw.asarray(Y0), fw.asarray(T), backend=case.backend,
                       method=case.method, rtol=RTOL, atol=RTOL, regularizer=reg, key=key)
    return sol


# -- check 5 ----------------------------------------------------------------------------------
def test_key_determinism(backend_case, fw):
    """The same int key gives the same LocalError value; other keys (almost surely) others."""
    reg = local_unbiased()
    v = [float(fw.to_numpy(_solve_value(backend_case, fw, k, reg).reg)) for k in (0, 0, 1, 2)]
    assert v[0] == v[1], f"key=0 twice gave {v[0]!r} and {v[1]!r}"
    assert v[2] != v[0] or v[3] != v[0], f"keys 0, 1, 2 all gave {v[0]!r}"


# -- check 8 ----------------------------------------------------------------------------------
def test_local_error_unbiased_runs(backend_case, fw):
    """A backend's Run is reachable through regularizers only: LocalError with the unbiased
    sampler (state from the solve's dense output at tau) gives a finite, non-negative value,
    and its extra step is counted in ``stats.nfe_reg``."""
    sol = _solve_value(backend_case, fw, 3, local_unbiased())
    value = float(fw.to_numpy(sol.reg))
    assert np.isfinite(value) and value >= 0, value
    assert int(fw.to_numpy(sol.stats.nfe_reg)) > 0


# -- check 6 ----------------------------------------------------------------------------------
def _rows(case, fw, aux):
    """The recorded grid as rows ``(sel, t, dt, dt_taken, ys, error)`` of real entries: one
    row for the whole batch (``sel`` all of ``y0``), or on a backend with
    :attr:`~regnde.backend.Backend.per_sample_steps` one per sample (``sel`` its single-sample
    slice ``b:b+1``; ``ys`` of shape ``(n_b, 1, *features)``)."""
    t, dt, mask, taken, ys, err = (None if x is None else fw.to_numpy(x) for x in aux)
    taken = dt if taken is None else taken
    if not backend(case).per_sample_steps:
        return [(slice(None), t[mask], dt[mask], taken[mask],
                 None if ys is None else ys[mask], err[mask])]
    return [(slice(b, b + 1), t[b][m], dt[b][m], taken[b][m],
             None if ys is None else ys[b][m][:, None], err[b][m]) for b, m in enumerate(mask)]


def _scalar(fw, x):
    """The one number in ``x`` (a step's error on a single-sample ``y`` may be ``(1,)``)."""
    x = np.asarray(fw.to_numpy(x))
    assert x.size == 1, x.shape
    return float(x.reshape(()))


def _step(case, fw, f, t, y, dt):
    return regnde.step(f, fw.asarray(t), y, backend=case.backend, method=case.method,
                       dt=fw.asarray(dt), rtol=GTOL, atol=GTOL)


def _directions(g, seed):
    """The gradient's own direction and a fixed random one (unit vectors)."""
    r = np.random.default_rng(seed).standard_normal(g.shape)
    out = [r / np.linalg.norm(r)]
    if np.linalg.norm(g) > 0:
        out.insert(0, g / np.linalg.norm(g))
    return out


def _check_fd(name, fn, x0, g):
    """Central differences of ``fn`` at ``x0`` along unit directions against ``g``."""
    for v in _directions(g, seed=x0.size):
        fd = (fn(x0 + H * v) - fn(x0 - H * v)) / (2 * H)
        ad = float(g.ravel() @ v.ravel())
        assert abs(ad - fd) <= GRAD_RTOL * np.linalg.norm(g), (
            f"d/d{name} along a unit direction: autodiff {ad!r}, finite differences {fd!r}, "
            f"|g| = {np.linalg.norm(g):.6g}")


def _need_direct(case):
    require("direct" in backend(case).sensitivities,
            f"backend {case.backend!r} has no sensitivity='direct' (GlobalError needs it)")


@functools.cache
def global_plus_local() -> Any:
    """``GlobalError() + LocalError("biased")``: both gradients from one solve (one compile
    on compiled backends; the trace's errors tell the two values apart)."""
    return GlobalError() + LocalError(sampler="biased")


def test_regularizer_gradients(backend_case, fw):
    """d(GlobalError + LocalError(biased)) / d(y0, parameters) against central differences of
    the replay on the recorded grid:

    - GlobalError: ``sum_j error(step(t_j, y_j, dt_taken_j)) * |dt_j|``, ``y_{j+1}`` the step's
      ``y1`` (chained from ``y0``), equal to ``sum(trace.error * |trace.dt|)``;
    - LocalError(biased): ``error(step(t_j, u_j, dt_j)) * |dt_j|`` at the sampled step start
      ``t_j`` with ``u_j = trace.y[j]`` a constant (so it adds nothing to d/dy0).

    On a per-sample trace each sample's row is replayed on its own (single-sample ``y``) and
    both values are the mean over samples (:class:`regnde.Trace`).
    """
    case = backend_case
    _need_direct(case)
    theta = flatten(PARAMS)

    def fn(y0, flat):
        sol = regnde.solve(_f(fw, flat), y0, fw.asarray(T), backend=case.backend,
                           method=case.method, rtol=GTOL, atol=GTOL,
                           regularizer=global_plus_local(), key=0, trace="full")
        tr = sol.trace
        return sol.reg, (tr.t, tr.dt, tr.mask, tr.dt_taken, tr.y, tr.error)

    value, aux, (g_y0, g_theta) = fw.value_and_grad(fn, [Y0, theta])
    rows = _rows(case, fw, aux)
    assert all(r[4] is not None for r in rows), "trace='full' records the states at step starts"
    global_value = float(np.mean([np.sum(err * np.abs(dts)) for *_, dts, _, _, err in rows]))
    local_value = value - global_value

    def global_replay(y0, flat):
        f, total = _f(fw, flat), 0.0
        for sel, ts, dts, taken, _, _ in rows:
            y = fw.asarray(y0[sel])
            for t, dt, dt_taken in zip(ts, dts, taken, strict=True):
                r = _step(case, fw, f, t, y, dt_taken)
                total += _scalar(fw, r.error) * abs(dt)
                y = r.y1
        return total / len(rows)

    def local_step(row, j, flat):
        _, ts, dts, _, ys, _ = rows[row]
        r = _step(case, fw, _f(fw, flat), ts[j], fw.asarray(ys[j]), dts[j])
        return _scalar(fw, r.error) * abs(dts[j])

    def local_replay(js, flat):
        return float(np.mean([local_step(i, j, flat) for i, j in enumerate(js)]))

    base = global_replay(Y0, theta)
    assert base == pytest.approx(global_value, rel=1e-9), (
        f"the replay gives GlobalError {base!r}, the trace {global_value!r}")
    # the sampled step of each row: the combination whose mean reproduces the local value
    steps = [[local_step(i, j, theta) for j in range(len(r[1]))] for i, r in enumerate(rows)]
    combos = list(itertools.product(*(range(len(c)) for c in steps)))
    candidates = [float(np.mean([c[j] for c, j in zip(steps, js, strict=True)])) for js in combos]
    best = int(np.argmin([abs(c - local_value) for c in candidates]))
    js = combos[best]
    assert candidates[best] == pytest.approx(local_value, rel=1e-8, abs=1e-14), (
        f"no recorded step reproduces LocalError(biased) = {local_value!r}: {steps}")

    _check_fd("y0", lambda y: global_replay(y, theta), Y0, g_y0)
    _check_fd("params", lambda p: global_replay(Y0, p) + local_replay(js, p), theta, g_theta)
