"""Check 1: ``regnde.step`` with a given ``dt`` is the explicit Runge–Kutta step of the method's
tableau (recomputed here in numpy), forwards and backwards in time."""

from __future__ import annotations

import numpy as np
import pytest

import regnde

from .problem import (
    ATOL,
    PARAMS,
    RTOL,
    Y0,
    F,
    backend,
    np_rk_rows,
    np_rk_step,
    require,
    rms_scaled,
    row,
    shampine,
    tableau_of,
)

DTS = (0.1, -0.1)
T0 = 0.3


def _forms(case, dt):
    """The ``(t, dt)`` a step is taken from: one for all samples; on a backend with
    :attr:`~regnde.backend.Backend.per_sample_steps` also one per sample (each different)."""
    out = [(T0, dt)]
    if backend(case).per_sample_steps:
        b = np.arange(len(Y0))
        out.append((T0 + 0.2 * b, dt * (1 - 0.25 * b)))
    return out


def _step(case, fw, t0, dt):
    tab = tableau_of(case)
    require(tab is not None, f"method {case.method!r} of {case.backend!r} has no Runge–Kutta "
                             f"tableau to recompute a step from")
    f = fw.field({k: fw.asarray(v) for k, v in PARAMS.items()})
    res = regnde.step(f, fw.asarray(t0), fw.asarray(Y0), backend=case.backend,
                      method=case.method, dt=fw.asarray(dt), rtol=RTOL, atol=ATOL)
    ref = (np_rk_step(F, tab, t0, Y0, dt) if np.ndim(t0) == np.ndim(dt) == 0
           else np_rk_rows(F, tab, t0, Y0, dt))
    return tab, res, ref


def _per_sample(case, x, name):
    """``x`` (numpy) is one value per sample on a backend with per-sample steps, else one."""
    want = Y0.shape[:1] if backend(case).per_sample_steps else ()
    assert np.shape(x) == want, f"{name} has shape {np.shape(x)}, expected {want}"
    return x


@pytest.mark.parametrize("dt", DTS)
def test_step_equals_tableau_step(case, fw, dt):
    """y1 and the stages to 1e-12; the unscaled error ``y1 - y1_hat = dt sum(b_error k)``
    rebuilt from the returned stages equals the tableau's. With per-sample steps, also from
    one ``t``/``dt`` per sample, each row against its own step."""
    for t0, h in _forms(case, dt):
        tab, res, ref = _step(case, fw, t0, h)
        y1 = fw.to_numpy(res.y1)
        assert y1.shape == Y0.shape
        np.testing.assert_allclose(y1, ref.y1, rtol=1e-12, atol=1e-12)
        k = fw.to_numpy(res.stages)
        assert k.shape == (tab.stages, *Y0.shape), "stages: (stages, *y.shape) of f values"
        np.testing.assert_allclose(k, ref.k, rtol=1e-12, atol=1e-12)
        h_rows = np.reshape(h, np.shape(h) + (1,) * (Y0.ndim - 1))
        err = h_rows * np.tensordot(np.asarray(tab.b_error), k, axes=1)
        np.testing.assert_allclose(err, ref.err, rtol=1e-9, atol=1e-15)
        shapes = {(), Y0.shape[:1]} if backend(case).per_sample_steps else {()}
        for name, got, want in (("dt", res.dt, h), ("t", res.t, t0)):
            got = fw.to_numpy(got)
            assert np.shape(got) in shapes, (name, np.shape(got))
            assert np.all(np.broadcast_to(got, Y0.shape[:1]) == want), (name, got, want)


@pytest.mark.parametrize("dt", DTS)
def test_step_error_is_rms_scaled(case, fw, dt):
    """``error`` is ``rms(err / (atol + rtol max(|y|, |y1|)))`` (the number the controller
    compares with 1); ``stiffness`` is Shampine's estimate where the tableau has a pair. With
    per-sample steps both are ``(batch,)``, each sample's own from its row."""
    per_sample = backend(case).per_sample_steps
    for t0, h in _forms(case, dt):
        tab, res, ref = _step(case, fw, t0, h)
        refs = [row(ref, b) for b in range(len(Y0))] if per_sample else [ref]
        y = [Y0[b] for b in range(len(Y0))] if per_sample else [Y0]
        want = np.array([rms_scaled(r.err, y0, r.y1, RTOL, ATOL) for r, y0 in zip(refs, y,
                                                                                   strict=True)])
        got = _per_sample(case, fw.to_numpy(res.error), "error")
        assert np.ravel(got) == pytest.approx(want, rel=1e-8), (got, want)
        if tab.stiffness_pair is None:
            assert res.stiffness is None
        else:
            stiff = _per_sample(case, fw.to_numpy(res.stiffness), "stiffness")
            want = np.array([shampine(r, tab) for r in refs])
            assert np.ravel(stiff) == pytest.approx(want, rel=1e-8), (stiff, want)
