"""torchdiffeq's tables and tableaus as regnde sees them, and the one Runge–Kutta step every
torchdiffeq path takes.

Holds torchdiffeq's internal modules (``td_odeint``, ``td_adjoint``, ``td_misc``), its solver table
(:data:`SOLVERS`, and :data:`ORIGINAL`, the table as torchdiffeq built it), the names regnde
runs torchdiffeq's adaptive methods under (:data:`NATIVE`, :data:`ALIASES`), conversion of
tableaus both ways, Shampine's stiffness estimate from a step's stages, :func:`rk_step` and
:class:`Counting` (a field that counts its evaluations).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
import torchdiffeq  # noqa: F401  (imports the submodules below)
from torchdiffeq._impl.rk_common import _ButcherTableau, _runge_kutta_step

from regnde.adapters.torch.keys import check_field_output
from regnde.tableau import Tableau, equal_c_pair

# torchdiffeq._impl.__init__ shadows the module ``odeint`` with the function of that name.
td_odeint = importlib.import_module("torchdiffeq._impl.odeint")
td_adjoint = importlib.import_module("torchdiffeq._impl.adjoint")
td_misc = importlib.import_module("torchdiffeq._impl.misc")

#: torchdiffeq's solver table (regnde's classes are in it only while a regnde context is open).
SOLVERS: dict[str, Any] = td_odeint.SOLVERS
#: The table as torchdiffeq built it.
ORIGINAL: dict[str, Any] = dict(SOLVERS)

#: canonical regnde name -> torchdiffeq name, for torchdiffeq's own adaptive RK methods.
NATIVE = {"dopri5": "dopri5", "dopri8": "dopri8", "bosh3": "bosh3", "fehlberg2": "fehlberg2",
          "heun": "adaptive_heun"}
ALIASES = {"adaptive_heun": "heun"}


# -- tableaus ---------------------------------------------------------------------------------
def to_regnde(name: str, td: _ButcherTableau, order: int, pair: tuple[int, int] | None,
              mid: Any = None) -> Tableau:
    """A :class:`Tableau` from torchdiffeq's coefficients (the values it actually runs)."""
    c = (0.0, *(float(x) for x in td.alpha))
    a = ((), *(tuple(float(x) for x in row) for row in td.beta))
    mid_t = None if mid is None else tuple(float(x) for x in mid)
    return Tableau(name, order=order, c=c, a=a, b=tuple(float(x) for x in td.c_sol),
                   b_error=tuple(float(x) for x in td.c_error), stiffness_pair=pair, mid=mid_t)


def to_torchdiffeq(tab: Tableau) -> _ButcherTableau:
    """torchdiffeq's ``_ButcherTableau`` of ``tab`` (float64)."""
    f64 = torch.float64
    return _ButcherTableau(
        alpha=torch.tensor(tab.c[1:], dtype=f64),
        beta=[torch.tensor(row, dtype=f64) for row in tab.a[1:]],
        c_sol=torch.tensor(tab.b, dtype=f64),
        c_error=torch.tensor(tab.b_error, dtype=f64),
    )


@functools.cache
def native_tableau(name: str) -> Tableau:
    """The :class:`Tableau` torchdiffeq runs for the regnde method ``name`` (a key of
    :data:`NATIVE`)."""
    cls = ORIGINAL[NATIVE[name]]
    c = [0.0, *(float(x) for x in cls.tableau.alpha)]
    return to_regnde(name, cls.tableau, cls.order, equal_c_pair(c), cls.mid)


# -- the one RK step every path uses -----------------------------------------------------------
def stiffness_ratio(k: torch.Tensor, tab: Tableau, w: torch.Tensor) -> torch.Tensor:
    """``|k_p - k_q| / |sum_j w_j k_j|``: Shampine's estimate times ``|dt|`` (stages last).

    Runs every accepted step, so it is four kernels: the caller divides by ``|dt|`` (in one
    batch for a whole trace)."""
    p, q = tab.stiffness_pair  # type: ignore[misc]
    num = torch.dist(k[..., p], k[..., q])
    den = torch.linalg.vector_norm(torch.matmul(k, w))
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def _stiffness(k: torch.Tensor, dt: torch.Tensor, tab: Tableau, w: torch.Tensor | None
               ) -> torch.Tensor | None:
    """Shampine's estimate ``|k_p - k_q| / |Y_p - Y_q|`` with ``Y_p - Y_q = dt sum_j w_j k_j``."""
    if w is None:
        return None
    return stiffness_ratio(k, tab, w) / dt.abs().to(k.dtype)


def diff_weights(tab: Tableau, like: torch.Tensor) -> torch.Tensor | None:
    """``w`` with ``Y_p - Y_q = dt * sum_j w_j k_j`` for the stiffness pair, or ``None``."""
    w = tab.stage_difference_weights()
    return None if w is None else torch.tensor(w, dtype=like.dtype, device=like.device)


def rk_step(func: Any, tab: Tableau, td: _ButcherTableau, y: torch.Tensor, f0: torch.Tensor,
            t0: torch.Tensor, dt: torch.Tensor, rtol: Any, atol: Any, norm: Any,
            w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                             torch.Tensor]:
    """``(y1, error, stiffness, k)`` of one step in the solver's (increasing) time."""
    y1, _, y1_error, k = _runge_kutta_step(func, y, f0, t0, dt, t0 + dt, tableau=td)
    error = td_misc._compute_error_ratio(y1_error, rtol, atol, y, y1, norm)
    return y1, error, _stiffness(k, dt, tab, w), k


def device_tableau(td: _ButcherTableau, like: torch.Tensor) -> _ButcherTableau:
    """``td`` in the dtype and on the device of ``like``."""
    kw = {"dtype": like.dtype, "device": like.device}
    return _ButcherTableau(alpha=td.alpha.to(**kw), beta=[b.to(**kw) for b in td.beta],
                           c_sol=td.c_sol.to(**kw), c_error=td.c_error.to(**kw))


class Counting:
    """Counts vector-field evaluations; forwards torchdiffeq's callbacks. With ``check`` the
    first evaluation's shape and dtype are checked against the state's."""

    def __init__(self, func: Any, check: bool = False):
        self.func, self.n, self.check = func, 0, check

    def __call__(self, t: Any, y: Any, **kw: Any) -> Any:
        self.n += 1
        out = self.func(t, y, **kw)
        if self.check:
            self.check = False
            check_field_output(out, y)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.func, name)


def td_method_name(tab: Tableau) -> str:
    """The name a registered tableau runs under in torchdiffeq's solver table."""
    return tab.name if tab.name not in ORIGINAL else f"regnde_{tab.name}"
