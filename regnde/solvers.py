"""Built-in tableaus, registered through the same plugin hook third parties use.

Where a backend has its own implementation of one of these methods, the backend runs its own
and the tableau here documents the coefficients (tests check the two agree). ``tsit5`` is
missing from torchdiffeq, so there the tableau itself runs.
"""

from __future__ import annotations

from collections.abc import Callable

from regnde.plugins.hookspecs import hookimpl
from regnde.tableau import Tableau

# Dormand–Prince 5(4) with Shampine's embedded solution, as torchdiffeq and diffrax use it.
DOPRI5 = Tableau(
    "dopri5",
    order=5,
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0),
    b_error=(
        35 / 384 - 1951 / 21600,
        0,
        500 / 1113 - 22642 / 50085,
        125 / 192 - 451 / 720,
        -2187 / 6784 - -12231 / 42400,
        11 / 84 - 649 / 6300,
        -1.0 / 60.0,
    ),
    stiffness_pair=(5, 6),
)

# Tsitouras 5(4) (2011); coefficients as diffrax and OrdinaryDiffEq.jl use them.
TSIT5 = Tableau(
    "tsit5",
    order=5,
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
         -0.028269050394068383),
        (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
         2.324710524099774),
    ),
    b=(0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
       2.324710524099774, 0.0),
    b_error=(0.0017800110522257773, 0.0008164344596567463, -0.007880878010261994,
             0.1447110071732629, -0.5823571654525552, 0.45808210592918686,
             -0.015151515151515152),
    stiffness_pair=(5, 6),
)

# Bogacki–Shampine 3(2).
BOSH3 = Tableau(
    "bosh3",
    order=3,
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
)

# Heun–Euler 2(1) (torchdiffeq's adaptive_heun, diffrax's Heun).
HEUN = Tableau(
    "heun",
    order=2,
    c=(0.0, 1.0),
    a=((), (1.0,)),
    b=(0.5, 0.5),
    b_error=(0.5, -0.5),
)

# Runge–Kutta–Fehlberg 2(1).
FEHLBERG2 = Tableau(
    "fehlberg2",
    order=2,
    c=(0.0, 1 / 2, 1.0),
    a=((), (1 / 2,), (1 / 256, 255 / 256)),
    b=(1 / 512, 255 / 256, 1 / 512),
    b_error=(-1 / 512, 0.0, 1 / 512),
)

BUILTIN = (DOPRI5, TSIT5, BOSH3, HEUN, FEHLBERG2)


@hookimpl
def regnde_register_solvers(register: Callable[[Tableau], None]) -> None:
    for tableau in BUILTIN:
        register(tableau)
