"""A third-party regnde plugin: one more Runge–Kutta method, as data.

After ``pip install ./examples/regnde-ralston-plugin``::

    regnde.solve(f, y0, t, method="ralston2")              # torchdiffeq
    regnde.solve(f, y0, t, method="ralston2", backend=...)  # every backend that runs tableaus
"""

import regnde

#: Ralston's method (order 2, minimal truncation error) with explicit Euler as the embedded
#: solution: not FSAL, so backends evaluate f(t1, y1) for the next step.
RALSTON2 = regnde.Tableau(
    "ralston2",
    order=2,
    c=(0.0, 2 / 3),
    a=((), (2 / 3,)),
    b=(1 / 4, 3 / 4),
    b_error=(1 / 4 - 1.0, 3 / 4),
)


@regnde.hookimpl
def regnde_register_solvers(register):
    register(RALSTON2)
