"""The contract suite's problem and its independent references, in numpy float64 only: the
initial state, output times, an explicit Runge–Kutta step computed from a :class:`regnde.Tableau`
and a high-accuracy reference solution (scipy's DOP853)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from regnde.plugins.manager import registry

from .frameworks import mlp_params, np_field

PARAMS = mlp_params()
Y0 = np.random.default_rng(1).standard_normal((2, 3))
T = np.array([0.0, 0.5, 1.0])
RTOL = ATOL = 1e-6
F = np_field(PARAMS)


def backend(case: Any) -> Any:
    """The case's :class:`regnde.backend.Backend` object (capabilities, ``make_key``)."""
    return registry().backend(case.backend)


def require(ok: bool, reason: str) -> None:
    """xfail the test where the backend legitimately lacks what it checks."""
    if not ok:
        pytest.xfail(reason)


def tableau_of(case: Any) -> Any:
    """The :class:`regnde.Tableau` the case's method runs with, as :func:`regnde.solve` resolves
    it: the backend's own for its native methods, else the registered one (``None``: the method
    has no Runge–Kutta tableau)."""
    b = backend(case)
    native = b.native_methods()
    name = b.aliases().get(case.method, case.method)
    if name in native and native[name] is not None:
        return native[name]
    return registry().tableaus().get(name)


@dataclass
class NpStep:
    y1: np.ndarray
    k: np.ndarray  # (stages, *y.shape)
    Y: np.ndarray  # stage states
    err: np.ndarray  # y1 - y1_hat = dt * sum(b_error * k)


def np_rk_step(f: Any, tab: Any, t: float, y: np.ndarray, dt: float) -> NpStep:
    """One explicit RK step from the tableau's coefficients, written out."""
    ks: list[np.ndarray] = []
    Ys: list[np.ndarray] = []
    for i in range(tab.stages):
        yi = y.copy()
        for j, a in enumerate(tab.a[i]):
            yi = yi + dt * a * ks[j]
        Ys.append(yi)
        ks.append(f(t + tab.c[i] * dt, yi))
    y1 = y + dt * sum(b * k for b, k in zip(tab.b, ks, strict=True))
    err = dt * sum(e * k for e, k in zip(tab.b_error, ks, strict=True))
    return NpStep(y1=y1, k=np.stack(ks), Y=np.stack(Ys), err=err)


def np_rk_rows(f: Any, tab: Any, t: Any, y: np.ndarray, dt: Any) -> NpStep:
    """:func:`np_rk_step` of each sample (row of ``y``) from its own ``t[b]``, ``dt[b]``
    (scalars are one for all); fields as :func:`np_rk_step`'s for the whole batch."""
    ts, dts = np.broadcast_to(t, y.shape[:1]), np.broadcast_to(dt, y.shape[:1])
    rows = [np_rk_step(f, tab, float(ts[b]), y[b], float(dts[b])) for b in range(len(y))]
    return NpStep(y1=np.stack([r.y1 for r in rows]), k=np.stack([r.k for r in rows], 1),
                  Y=np.stack([r.Y for r in rows], 1), err=np.stack([r.err for r in rows]))


def row(step: NpStep, b: int) -> NpStep:
    """Sample ``b`` of a batched :class:`NpStep`."""
    return NpStep(y1=step.y1[b], k=step.k[:, b], Y=step.Y[:, b], err=step.err[b])


def rms_scaled(err: np.ndarray, y: np.ndarray, y1: np.ndarray, rtol: float, atol: float
               ) -> float:
    """``rms(err / (atol + rtol * max(|y|, |y1|)))``: the scaled error of torchdiffeq's and
    diffrax's controllers (RESEARCH.md, docs/diffrax.md)."""
    scale = atol + rtol * np.maximum(np.abs(y), np.abs(y1))
    return float(np.sqrt(np.mean((err / scale) ** 2)))


def shampine(step: NpStep, tab: Any) -> float:
    """``|k_p - k_q| / |Y_p - Y_q|`` for the tableau's stiffness pair."""
    p, q = tab.stiffness_pair
    return float(np.linalg.norm(step.k[p] - step.k[q]) / np.linalg.norm(step.Y[p] - step.Y[q]))


def reference(y0: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The solution at ``t`` (either direction) by DOP853 at rtol 1e-12, ``(len(t), *shape)``."""
    sol = solve_ivp(lambda s, y: F(s, y.reshape(y0.shape)).ravel(), (t[0], t[-1]), y0.ravel(),
                    method="DOP853", rtol=1e-12, atol=1e-14, t_eval=t)
    assert sol.success, sol.message
    return sol.y.T.reshape(len(t), *y0.shape)
