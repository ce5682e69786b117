"""Explicit embedded Runge–Kutta methods as data.

A :class:`Tableau` is the one description of a method that every backend reads: torchdiffeq
runs it through a generic solver class, diffrax through a generic ``AbstractERK``, and the
recorded errors and stiffness estimates of every backend are defined by it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

_TOL = 1e-10


def _floats(name: str, values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def equal_c_pair(c: tuple[float, ...] | list[float]) -> tuple[int, int] | None:
    """The last two stages with equal nodes ``c`` (Dormand–Prince, Tsit5: 0-based 5 and 6):
    the pair Shampine's stiffness estimate uses, or ``None``."""
    for p in range(len(c) - 1, 0, -1):
        for q in range(p - 1, -1, -1):
            if c[p] == c[q]:
                return (q, p)
    return None


@dataclass(frozen=True)
class Tableau:
    """An explicit embedded Runge–Kutta method.

    Args:
        name: method name, as users pass it to ``method=``.
        order: order of the propagated solution (controls the step-size exponent).
        c: nodes, one per stage, ``c[0] == 0``.
        a: strictly lower triangle; row ``i`` holds the ``i`` coefficients of stage ``i``
            (row 0 is empty).
        b: solution weights, one per stage.
        b_error: error weights ``b - b_hat`` (sum to zero).
        error_order: order of the embedded solution (default ``order - 1``).
        stiffness_pair: two 0-based stage indices with equal ``c`` used for Shampine's
            stiffness estimate ``|k_p - k_q| / |Y_p - Y_q|``, or ``None``.
        mid: optional weights for the state at the step's midpoint (dense output); without
            them backends interpolate by cubic Hermite.

    Raises:
        ValueError: naming the tableau and the rule it breaks.
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...]
    error_order: int | None = None
    stiffness_pair: tuple[int, int] | None = None
    mid: tuple[float, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            set_(self, "c", _floats("c", self.c))
            set_(self, "a", tuple(_floats("a", row) for row in self.a))
            set_(self, "b", _floats("b", self.b))
            set_(self, "b_error", _floats("b_error", self.b_error))
            if self.mid is not None:
                set_(self, "mid", _floats("mid", self.mid))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"Tableau {self.name!r}: coefficients must be sequences of numbers ({exc})."
            ) from None
        if self.error_order is None:
            set_(self, "error_order", self.order - 1)
        if self.stiffness_pair is not None:
            set_(self, "stiffness_pair", tuple(int(i) for i in self.stiffness_pair))
        self._validate()

    def _fail(self, rule: str) -> None:
        raise ValueError(f"Tableau {self.name!r} is invalid: {rule}.")

    def _validate(self) -> None:
        s = len(self.c)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Tableau name must be a non-empty string, got {self.name!r}.")
        if not isinstance(self.order, int) or self.order < 1:
            self._fail(f"order must be a positive integer, got {self.order!r}")
        if s < 1:
            self._fail("it needs at least one stage (len(c) >= 1)")
        for field_name in ("c", "a", "b", "b_error", "mid"):
            values = getattr(self, field_name)
            flat = [x for row in values for x in row] if field_name == "a" else values or ()
            bad = [x for x in flat if not math.isfinite(x)]
            if bad:
                self._fail(f"{field_name} holds non-finite values ({bad[0]!r}); every "
                           f"coefficient must be a finite number")
        if abs(self.c[0]) > _TOL:
            self._fail(f"c[0] must be 0, got {self.c[0]}")
        if len(self.a) != s:
            self._fail(f"a must have one row per stage ({s}), got {len(self.a)} rows")
        for i, row in enumerate(self.a):
            if len(row) != i:
                self._fail(f"row {i} of a must hold {i} coefficients, got {len(row)}")
            if i and abs(math.fsum(row) - self.c[i]) > _TOL:
                self._fail(f"row {i} of a sums to {math.fsum(row)!r} but c[{i}] = {self.c[i]!r}")
        if len(self.b) != s or len(self.b_error) != s:
            self._fail(
                f"b and b_error must have one entry per stage ({s}), "
                f"got {len(self.b)} and {len(self.b_error)}"
            )
        if abs(math.fsum(self.b) - 1.0) > _TOL:
            self._fail(f"sum(b) must be 1, got {math.fsum(self.b)!r}")
        if abs(math.fsum(self.b_error)) > _TOL:
            self._fail(f"sum(b_error) must be 0, got {math.fsum(self.b_error)!r}")
        if all(abs(x) <= _TOL for x in self.b_error):
            self._fail("b_error is all zero: the method would have no error estimate, so the "
                       "step-size controller could never reject a step and GlobalError would "
                       "be 0; give the embedded method's weights as b_error = b - b_hat")
        if self.mid is not None and len(self.mid) != s:
            self._fail(f"mid must have one entry per stage ({s}), got {len(self.mid)}")
        if self.stiffness_pair is not None:
            p, q = self.stiffness_pair
            if not (0 <= p < s and 0 <= q < s and p != q):
                self._fail(
                    f"stiffness_pair {self.stiffness_pair} must name two distinct stages < {s}"
                )
            if abs(self.c[p] - self.c[q]) > _TOL:
                self._fail(
                    f"stiffness_pair {self.stiffness_pair} needs equal c, "
                    f"got {self.c[p]} and {self.c[q]}"
                )

    @property
    def stages(self) -> int:
        """Number of stages."""
        return len(self.c)

    @property
    def fsal(self) -> bool:
        """First-same-as-last: the last stage is evaluated at ``(t1, y1)``."""
        last = self.a[-1]
        return (
            len(self.c) > 1
            and abs(self.c[-1] - 1.0) < _TOL
            and abs(self.b[-1]) < _TOL
            and all(abs(x - y) < _TOL for x, y in zip(last, self.b[:-1], strict=True))
        )

    def stage_difference_weights(self) -> tuple[float, ...] | None:
        """Weights ``w`` with ``Y_p - Y_q = dt * sum_j w_j k_j`` for the stiffness pair."""
        if self.stiffness_pair is None:
            return None
        p, q = self.stiffness_pair
        rows = [(*row, *([0.0] * (self.stages - len(row)))) for row in self.a]
        return tuple(x - y for x, y in zip(rows[p], rows[q], strict=True))
