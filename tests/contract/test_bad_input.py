"""Check 7: bad input is refused before solving, with messages that say what is valid."""

from __future__ import annotations

import numpy as np
import pytest

import regnde

from .problem import PARAMS, RTOL, Y0, T


def _solve(case, fw, y0=Y0, t=T, method=None):
    f = fw.field({k: fw.asarray(v) for k, v in PARAMS.items()})
    return regnde.solve(f, fw.asarray(y0), fw.asarray(t), backend=case.backend,
                        method=method or case.method, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("entry", ["solve", "step"])
def test_unknown_method_lists_valid_ones(backend_case, fw, entry):
    f = fw.field({k: fw.asarray(v) for k, v in PARAMS.items()})
    with pytest.raises(ValueError, match="no_such_method") as info:
        if entry == "solve":
            _solve(backend_case, fw, method="no_such_method")
        else:
            regnde.step(f, fw.asarray(0.0), fw.asarray(Y0), backend=backend_case.backend,
                        method="no_such_method", dt=fw.asarray(0.1))
    msg = str(info.value)
    missing = [m for m in regnde.methods(backend_case.backend) if m not in msg]
    assert not missing, f"the message does not list {missing}: {msg}"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_y0(backend_case, fw, bad):
    y0 = Y0.copy()
    y0[1, 2] = bad
    with pytest.raises((ValueError, regnde.NonFiniteError), match=r"(?i)nan|inf|finite"):
        _solve(backend_case, fw, y0=y0)


@pytest.mark.parametrize("t", [[0.0, 1.0, 0.5], [0.0, 0.0, 1.0], [1.0, 0.5, 0.7]],
                         ids=["up-down", "repeated", "down-up"])
def test_non_monotonic_t(backend_case, fw, t):
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        _solve(backend_case, fw, t=np.array(t))
