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
    np_rk_step,
    require,
    rms_scaled,
    shampine,
    tableau_of,
)

DTS = (0.1, -0.1)
T0 = 0.3


def _step(case, fw, dt):
    tab = tableau_of(case)
    require(tab is not None, f"method {case.method!r} of {case.backend!r} has no Runge–Kutta "
                             f"tableau to recompute a step from")
    f = fw.field({k: fw.asarray(v) for k, v in PARAMS.items()})
    res = regnde.step(f, fw.asarray(T0), fw.asarray(Y0), backend=case.backend,
                      method=case.method, dt=fw.asarray(dt), rtol=RTOL, atol=ATOL)
    return tab, res, np_rk_step(F, tab, T0, Y0, dt)


@pytest.mark.parametrize("dt", DTS)
def test_step_equals_tableau_step(case, fw, dt):
    """y1 and the stages to 1e-12; the unscaled error ``y1 - y1_hat = dt sum(b_error k)``
    rebuilt from the returned stages equals the tableau's."""
    tab, res, ref = _step(case, fw, dt)
    y1 = fw.to_numpy(res.y1)
    assert y1.shape == Y0.shape
    np.testing.assert_allclose(y1, ref.y1, rtol=1e-12, atol=1e-12)
    k = fw.to_numpy(res.stages)
    assert k.shape == (tab.stages, *Y0.shape), "stages: (stages, *y.shape) of f values"
    np.testing.assert_allclose(k, ref.k, rtol=1e-12, atol=1e-12)
    err = dt * np.tensordot(np.asarray(tab.b_error), k, axes=1)
    np.testing.assert_allclose(err, ref.err, rtol=1e-9, atol=1e-15)
    assert float(fw.to_numpy(res.dt)) == dt and float(fw.to_numpy(res.t)) == T0


@pytest.mark.parametrize("dt", DTS)
def test_step_error_is_rms_scaled(case, fw, dt):
    """``error`` is ``rms(err / (atol + rtol max(|y|, |y1|)))`` (the number the controller
    compares with 1); ``stiffness`` is Shampine's estimate where the tableau has a pair."""
    tab, res, ref = _step(case, fw, dt)
    want = rms_scaled(ref.err, Y0, ref.y1, RTOL, ATOL)
    got = float(fw.to_numpy(res.error))
    assert got == pytest.approx(want, rel=1e-8), (got, want)
    if tab.stiffness_pair is None:
        assert res.stiffness is None
    else:
        stiff = float(fw.to_numpy(res.stiffness))
        assert stiff == pytest.approx(shampine(ref, tab), rel=1e-8)
