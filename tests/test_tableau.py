"""Tableaus as data: validation rules, and the built-in coefficients against the backends'."""

from __future__ import annotations

import math
import re

import pytest
from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU

import regnde
from regnde import Tableau
from regnde.solvers import BUILTIN, DOPRI5, TSIT5

from .helpers import heun_euler

GOOD = dict(order=2, c=(0, 1), a=((), (1,)), b=(0.5, 0.5), b_error=(0.5, -0.5))


def test_a_valid_tableau_is_stored_as_floats() -> None:
    tab = Tableau("ok", **GOOD)
    assert tab.c == (0.0, 1.0) and tab.a == ((), (1.0,)) and tab.b == (0.5, 0.5)
    assert tab.error_order == 1 and tab.stages == 2 and not tab.fsal
    assert isinstance(tab.c[1], float)


# Each case breaks one rule; the message must name the tableau and the rule.
BROKEN = {
    "row sum": (dict(GOOD, c=(0, 0.9)), [r"row 1 of a sums to 1\.0", r"c\[1\] = 0\.9"]),
    "row sum, 3 stages": (
        dict(order=2, c=(0, 0.5, 1.0), a=((), (0.5,), (0.25, 0.7)), b=(0.25, 0.5, 0.25),
             b_error=(0.1, 0.0, -0.1)),
        [r"row 2 of a sums to", r"c\[2\]"]),
    "sum(b)": (dict(GOOD, b=(0.5, 0.6)), [r"sum\(b\) must be 1"]),
    "sum(b_error)": (dict(GOOD, b_error=(0.5, -0.4)), [r"sum\(b_error\) must be 0"]),
    "c[0]": (dict(GOOD, c=(0.1, 1), a=((), (1,))), [r"c\[0\] must be 0"]),
    "rows of a": (dict(GOOD, a=((),)), [r"a must have one row per stage \(2\)", "got 1 rows"]),
    "row length": (dict(GOOD, a=((), (0.5, 0.5))), [r"row 1 of a must hold 1 coefficients",
                                                    "got 2"]),
    "len(b)": (dict(GOOD, b=(1.0,)), [r"b and b_error must have one entry per stage \(2\)"]),
    "len(b_error)": (dict(GOOD, b_error=(0.5, -0.25, -0.25)),
                     [r"b and b_error must have one entry per stage"]),
    "stiffness pair c": (
        dict(order=2, c=(0, 0.5, 1.0), a=((), (0.5,), (0.0, 1.0)), b=(0.0, 1.0, 0.0),
             b_error=(0.5, -1.0, 0.5), stiffness_pair=(1, 2)),
        [r"stiffness_pair \(1, 2\) needs equal c", "0.5 and 1.0"]),
    "stiffness pair range": (dict(GOOD, stiffness_pair=(0, 5)), [r"two distinct stages < 2"]),
    "stiffness pair distinct": (dict(GOOD, stiffness_pair=(1, 1)), ["two distinct stages"]),
    "order": (dict(GOOD, order=0), ["order must be a positive integer"]),
    "not numbers": (dict(GOOD, b=("x", 0.5)), ["coefficients must be sequences of numbers"]),
    "finite": (dict(GOOD, b=(math.inf, 0.5), b_error=(0.5, -0.5)), ["sum\\(b\\)|finite"]),
}


@pytest.mark.parametrize("case", BROKEN)
def test_each_rule_raises_naming_tableau_and_rule(case: str) -> None:
    kwargs, patterns = BROKEN[case]
    with pytest.raises(ValueError) as info:
        Tableau("my_broken_rk", **kwargs)
    msg = str(info.value)
    assert "'my_broken_rk'" in msg
    for pat in patterns:
        assert re.search(pat, msg), (pat, msg)


def test_tolerance_of_the_sum_rules_is_1e_10() -> None:
    # within 1e-10: accepted; beyond: rejected
    Tableau("near", **dict(GOOD, b=(0.5, 0.5 + 5e-11), b_error=(0.5, -0.5 + 5e-11)))
    with pytest.raises(ValueError, match="sum\\(b\\)"):
        Tableau("far", **dict(GOOD, b=(0.5, 0.5 + 5e-10)))
    with pytest.raises(ValueError, match="sum\\(b_error\\)"):
        Tableau("far", **dict(GOOD, b_error=(0.5, -0.5 + 5e-10)))
    with pytest.raises(ValueError, match="row 1"):
        Tableau("far", **dict(GOOD, c=(0, 1 + 5e-10)))


def test_empty_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="name"):
        Tableau("", **GOOD)


def test_dopri5_is_shampines_and_equals_torchdiffeq() -> None:
    td = _DORMAND_PRINCE_SHAMPINE_TABLEAU
    assert DOPRI5.c[0] == 0.0
    assert max(abs(x - y) for x, y in zip(DOPRI5.c[1:], td.alpha.tolist(), strict=True)) <= 1e-15
    for row, td_row in zip(DOPRI5.a[1:], td.beta, strict=True):
        assert len(row) == len(td_row)
        assert max(abs(x - y) for x, y in zip(row, td_row.tolist(), strict=True)) <= 1e-15
    assert max(abs(x - y) for x, y in zip(DOPRI5.b, td.c_sol.tolist(), strict=True)) <= 1e-15
    assert max(abs(x - y) for x, y in zip(DOPRI5.b_error, td.c_error.tolist(),
                                          strict=True)) <= 1e-15
    # Shampine's b_hat, not Dormand and Prince's original
    shampine = (1951 / 21600, 0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)
    b_hat = [b - e for b, e in zip(DOPRI5.b, DOPRI5.b_error, strict=True)]
    assert max(abs(x - y) for x, y in zip(b_hat, shampine, strict=True)) <= 1e-15
    assert DOPRI5.fsal and DOPRI5.stiffness_pair == (5, 6)


def test_builtin_tableaus_have_their_order_conditions() -> None:
    """Sanity of the registered coefficients: sum(b c^k) = 1/(k+1) up to the order (k < 4)."""
    for tab in BUILTIN:
        for k in range(min(tab.order, 4)):
            got = math.fsum(b * c**k for b, c in zip(tab.b, tab.c, strict=True))
            assert abs(got - 1 / (k + 1)) < 1e-12, (tab.name, k, got)
    assert TSIT5.fsal and TSIT5.stiffness_pair == (5, 6)


def test_tableau_torchdiffeq_native_coefficients_match_builtins() -> None:
    """The built-in tableaus document what torchdiffeq runs for the same method."""
    backend = regnde.plugins.registry().backend("torchdiffeq")
    native = backend.native_methods()
    for tab in BUILTIN:
        if tab.name not in native:
            assert tab.name == "tsit5"
            continue
        td = native[tab.name]
        for field in ("c", "b", "b_error"):
            diff = max(abs(x - y) for x, y in zip(getattr(tab, field), getattr(td, field),
                                                    strict=True))
            assert diff <= 1e-15, (tab.name, field)


def test_stage_difference_weights() -> None:
    w = DOPRI5.stage_difference_weights()
    assert w is not None and len(w) == DOPRI5.stages
    # pair (p, q) = (5, 6): Y_p - Y_q = dt * sum_j (a_pj - a_qj) k_j
    assert w[-1] == 0.0 and abs(w[0] - (9017 / 3168 - 35 / 384)) < 1e-15
    assert heun_euler().stage_difference_weights() is None
