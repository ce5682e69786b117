"""Shared pieces of the test suite: the methods to parametrise over, small vector fields, an
independent Runge–Kutta implementation (plain torch, float64) to recompute what regnde records,
and fake entry points for plugin tests.

Nothing here calls regnde's own stepping code: recomputations read coefficients from
torchdiffeq's modules (for torchdiffeq's own methods) or from a :class:`regnde.Tableau`'s fields,
and do the arithmetic themselves.
"""

from __future__ import annotations

import importlib
import math
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

#: torchdiffeq's own adaptive RK methods, by the name a user passes (``adaptive_heun`` is the
#: alias of ``heun``), with the torchdiffeq name to run the reference with.
TORCHDIFFEQ_METHODS = {
    "dopri5": "dopri5",
    "dopri8": "dopri8",
    "bosh3": "bosh3",
    "fehlberg2": "fehlberg2",
    "heun": "adaptive_heun",
    "adaptive_heun": "adaptive_heun",
}
#: Every adaptive method regnde offers on torchdiffeq out of the box (canonical names).
ALL_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "heun", "tsit5")

F64 = torch.float64


# -- vector fields -----------------------------------------------------------------------------
class MLP(torch.nn.Module):
    """A small time-dependent MLP ``f(t, y) = W2 tanh(W1 [y, t] + b1) + b2`` (float64) that
    counts its calls in ``n``."""

    def __init__(self, dim: int = 3, hidden: int = 16, seed: int = 0, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(dim + 1, hidden, dtype=F64)
        self.l2 = torch.nn.Linear(hidden, dim, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(hidden))
        self.n = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.n += 1
        tt = torch.as_tensor(t, dtype=y.dtype).expand(*y.shape[:-1], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=-1))))


class Counted:
    """A plain function ``f(t, y)`` with a call counter ``n``."""

    def __init__(self, fn: Callable[[Any, Any], Any]):
        self.fn, self.n = fn, 0

    def __call__(self, t: Any, y: Any) -> Any:
        self.n += 1
        return self.fn(t, y)


class Linear(torch.nn.Module):
    """``y' = lam * y`` as a module (counts calls)."""

    def __init__(self, lam: float):
        super().__init__()
        self.lam = lam
        self.n = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return self.lam * y


def y0_for(dim: int = 3, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g, dtype=F64)


def times(direction: int, n: int = 4, t0: float = 0.0, t1: float = 1.5) -> torch.Tensor:
    t = torch.linspace(t0, t1, n, dtype=F64)
    return t if direction > 0 else t.flip(0)


# -- an independent RK implementation -----------------------------------------------------------
@dataclass
class RK:
    """Coefficients as plain floats: ``a`` is the full strictly lower triangle, row ``i`` has
    ``i`` entries. ``reuse_last`` is torchdiffeq's rule that a step's first stage is the previous
    accepted step's last stage (true for torchdiffeq's own classes; for FSAL methods it is
    ``f(t1, y1)`` anyway)."""

    name: str
    order: int
    c: list[float]
    a: list[list[float]]
    b: list[float]
    b_error: list[float]
    reuse_last: bool


_TD_TABLEAUS = {
    "dopri5": ("dopri5", "_DORMAND_PRINCE_SHAMPINE_TABLEAU", 5),
    "dopri8": ("dopri8", "_DOPRI8_TABLEAU", 8),
    "bosh3": ("bosh3", "_BOGACKI_SHAMPINE_TABLEAU", 3),
    "fehlberg2": ("fehlberg2", "_FEHLBERG2_TABLEAU", 2),
    "heun": ("adaptive_heun", "_ADAPTIVE_HEUN_TABLEAU", 2),
    "adaptive_heun": ("adaptive_heun", "_ADAPTIVE_HEUN_TABLEAU", 2),
}


def rk_of(method: str) -> RK:
    """Coefficients of a method as the solve runs them: torchdiffeq's own (read from its modules)
    for its methods, regnde's registered tableau otherwise."""
    if method in _TD_TABLEAUS:
        module, attr, order = _TD_TABLEAUS[method]
        td = getattr(importlib.import_module(f"torchdiffeq._impl.{module}"), attr)
        return RK(method, order, [0.0, *td.alpha.tolist()], [[], *(b.tolist() for b in td.beta)],
                  td.c_sol.tolist(), td.c_error.tolist(), reuse_last=True)
    from regnde.plugins.manager import registry

    return rk_from_tableau(registry().tableaus()[method])


def rk_from_tableau(tab: Any) -> RK:
    return RK(tab.name, tab.order, list(tab.c), [list(r) for r in tab.a], list(tab.b),
              list(tab.b_error), reuse_last=False)


def rk_step(f: Callable, rk: RK, t: torch.Tensor, y: torch.Tensor, dt: torch.Tensor,
            k0: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor],
                                                     list[torch.Tensor], torch.Tensor]:
    """``(y1, stages k, stage states Y, err)`` of one step in user time (``dt`` signed)."""
    ks: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for i, ci in enumerate(rk.c):
        yi = y
        for j, aij in enumerate(rk.a[i]):
            yi = yi + dt * aij * ks[j]
        ys.append(yi)
        ks.append(k0 if (i == 0 and k0 is not None) else f(t + ci * dt, yi))
    y1 = y
    for bi, ki in zip(rk.b, ks, strict=True):
        y1 = y1 + dt * bi * ki
    err = sum(dt * ei * ki for ei, ki in zip(rk.b_error, ks, strict=True))
    return y1, ks, ys, err


def error_ratio(err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol: float,
                atol: float) -> torch.Tensor:
    """``rms(err / (atol + rtol * max(|y0|, |y1|)))``."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return (err / scale).pow(2).mean().sqrt()


def next_dt(dt: float, err: float, order: int, safety: float = 0.9, ifactor: float = 10.0,
            dfactor: float = 0.2) -> float:
    """torchdiffeq's step-size controller (its defaults), written out."""
    if err == 0:
        return dt * ifactor
    if err < 1:
        dfactor = 1.0
    return dt * min(ifactor, max(safety / err ** (1.0 / order), dfactor))


def replay(f: Callable, rk: RK, trace: Any, rtol: float, atol: float, *, chain: bool = False,
           y0: torch.Tensor | None = None, last_dt: Any = None) -> dict[str, list]:
    """Recompute every recorded step from ``trace.t``, ``trace.dt`` and ``trace.y`` (or, with
    ``chain``, from ``y0`` and the replayed states, so gradients flow through the whole grid).

    ``last_dt`` replaces the last step's (clipped) dt by the step actually taken. Returns lists
    ``error``, ``y1``, ``stiff_ks`` (stages) and ``stage_y``."""
    out: dict[str, list] = {"error": [], "y1": [], "ks": [], "Y": []}
    n = len(trace.t)
    y = y0
    k_prev = None
    for j in range(n):
        t = trace.t[j].detach()
        dt = trace.dt[j].detach()
        if j == n - 1 and last_dt is not None:
            dt = torch.as_tensor(last_dt, dtype=F64)
        yj = y if chain else trace.y[j].detach()
        k0 = k_prev if (rk.reuse_last and k_prev is not None) else None
        y1, ks, ys, err = rk_step(f, rk, t, yj, dt, k0)
        out["error"].append(error_ratio(err, yj, y1, rtol, atol))
        out["y1"].append(y1)
        out["ks"].append(ks)
        out["Y"].append(ys)
        k_prev = ks[-1]
        y = y1
    return out


def full_last_dt(trace: Any, order: int) -> float:
    """The dt the controller proposed for the last accepted step (the step actually taken, before
    clipping to the end time), valid when no step was rejected."""
    dt = float(trace.dt[-2])
    return math.copysign(next_dt(abs(dt), float(trace.error[-2].detach()), order), dt)


# -- a hand-written adaptive solver (for registered, non-FSAL tableaus) -----------------------
def initial_step(f: Callable, t0: float, y0: torch.Tensor, order: int, rtol: float,
                 atol: float) -> tuple[float, torch.Tensor]:
    """Hairer, Nørsett & Wanner's starting step (II.4), as torchdiffeq does it; ``order`` is the
    method's order. Returns ``(h, f(t0, y0))``."""

    def rms(x: torch.Tensor) -> float:
        return float(x.detach().pow(2).mean().sqrt())

    f0 = f(torch.tensor(t0, dtype=F64), y0)
    scale = atol + y0.abs() * rtol
    d0, d1 = rms(y0 / scale), rms(f0 / scale)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    f1 = f(torch.tensor(t0 + h0, dtype=F64), y0 + h0 * f0)
    d2 = rms((f1 - f0) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100 * h0, h1), f0


def hermite(y0: torch.Tensor, f0: torch.Tensor, y1: torch.Tensor, f1: torch.Tensor, t0: float,
            dt: float, t: float) -> torch.Tensor:
    """Cubic Hermite interpolation on ``[t0, t0 + dt]`` (standard basis form)."""
    s = (t - t0) / dt
    h00, h10 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s
    h01, h11 = -2 * s**3 + 3 * s**2, s**3 - s**2
    return h00 * y0 + h10 * dt * f0 + h01 * y1 + h11 * dt * f1


def adaptive_solve(f: Callable, rk: RK, y0: torch.Tensor, t_out: list[float], rtol: float,
                   atol: float) -> dict[str, Any]:
    """A plain adaptive solver for an increasing ``t_out``: torchdiffeq's initial step and
    controller, ``f(t1, y1)`` evaluated after each accepted step (non-FSAL), overshoot of the end
    and cubic Hermite outputs. Returns the accepted steps and outputs."""
    t, y = t_out[0], y0
    h, fy = initial_step(f, t, y, rk.order, rtol, atol)
    steps: dict[str, list] = {"t": [], "dt": [], "y": [], "error": []}
    outs = [y0]
    rejected = 0
    i_out = 1
    while i_out < len(t_out):
        y1, _, _, err = rk_step(f, rk, torch.tensor(t, dtype=F64), y, torch.tensor(h, dtype=F64),
                                fy)
        e = float(error_ratio(err, y, y1, rtol, atol).detach())
        if e <= 1:
            f1 = f(torch.tensor(t + h, dtype=F64), y1)
            steps["t"].append(t)
            steps["dt"].append(h)
            steps["y"].append(y)
            steps["error"].append(e)
            while i_out < len(t_out) and t_out[i_out] <= t + h:
                outs.append(hermite(y, fy, y1, f1, t, h, t_out[i_out]))
                i_out += 1
            t, y, fy = t + h, y1, f1
        else:
            rejected += 1
        h = next_dt(h, e, rk.order)
    steps["dt"][-1] = min(steps["dt"][-1], t_out[-1] - steps["t"][-1])
    return {"steps": steps, "ys": torch.stack(outs), "rejected": rejected}


# -- plugins -----------------------------------------------------------------------------------
class FakeEntryPoint:
    """What ``importlib.metadata.entry_points`` yields: ``name``, ``value``, ``group``,
    ``load()``."""

    def __init__(self, name: str, value: str, load: Callable[[], Any]):
        self.name, self.value, self.group = name, value, "regnde"
        self._load = load

    def load(self) -> Any:
        return self._load()


def plugin_module(name: str, **hooks: Callable) -> types.ModuleType:
    """A module object holding ``hooks`` marked with ``regnde.hookimpl``."""
    import regnde

    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        fn.__name__ = hook_name
        setattr(mod, hook_name, regnde.hookimpl(fn))
    return mod


def fake_entry_points(monkeypatch: Any, plugins: dict[str, Any]) -> list[str]:
    """Make ``importlib.metadata.entry_points(group="regnde")`` yield one entry point per item:
    a module object (loaded as is) or an exception (raised on load, like a broken import).
    Returns a list that records the groups asked for."""
    asked: list[str] = []

    def loader(obj: Any) -> Callable[[], Any]:
        def load() -> Any:
            if isinstance(obj, BaseException):
                raise obj
            return obj

        return load

    eps = [FakeEntryPoint(name, f"{name}_module", loader(obj)) for name, obj in plugins.items()]

    def entry_points(**kw: Any) -> Iterable[FakeEntryPoint]:
        asked.append(kw.get("group"))
        return [ep for ep in eps if ep.group == kw.get("group")]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return asked


def heun_euler() -> Any:
    """The Heun–Euler 2(1) tableau of API.md's plugin example (not FSAL)."""
    import regnde

    return regnde.Tableau("heun_euler", order=2, c=(0, 1), a=((), (1,)), b=(0.5, 0.5),
                          b_error=(0.5, -0.5))


def fake_backend_class() -> type:
    """A minimal backend over numpy arrays with one native method, ``kvaerno5``; its ``solve``
    returns the request it got as ``ys`` (so tests can see what regnde passed)."""
    import numpy as np

    from regnde.backend import Backend
    from regnde.trace import Solution, Stats

    class FakeNumpyBackend(Backend):
        name = "fakenp"
        framework = "numpy"
        runs_tableaus = False
        default_method = "kvaerno5"

        def native_methods(self):
            return {"kvaerno5": None}

        def owns(self, y0):
            return isinstance(y0, np.ndarray)

        def solve(self, request):
            return Solution(ys=request, reg=None, stats=Stats())

        def step(self, request):
            raise NotImplementedError

        def make_key(self, key):
            return key

    return FakeNumpyBackend
