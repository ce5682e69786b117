"""Coefficient schedules."""

import math

import pytest

from regnde.schedules import Constant, Cosine, Exponential


def test_exponential_hits_endpoints_and_is_geometric_both_ways():
    down = Exponential(2.5, 1.0, 100)
    assert down(0) == pytest.approx(2.5) and down(100) == pytest.approx(1.0)
    assert down(50) == pytest.approx(math.sqrt(2.5))  # geometric midpoint
    assert down(1000) == pytest.approx(1.0)  # stays at l1
    up = Exponential(0.1, 5.0, 10)
    values = [up(i) for i in range(11)]
    assert values == sorted(values) and values[-1] == pytest.approx(5.0)
    k = math.log(2.5 / 1.0) / 100
    assert down(37) == pytest.approx(2.5 * math.exp(-k * 37))  # the references' l0 exp(-k t)


def test_cosine_and_constant():
    c = Cosine(1.0, 0.0, 10)
    assert c(0) == pytest.approx(1.0) and c(5) == pytest.approx(0.5)
    assert c(10) == pytest.approx(0.0) and c(20) == pytest.approx(0.0)
    assert Constant(3.0)(12345) == 3.0


@pytest.mark.parametrize("l0, l1", [(0.0, 1.0), (1.0, -1.0), (float("inf"), 1.0)])
def test_exponential_rejects_non_positive_endpoints(l0, l1):
    with pytest.raises(ValueError, match="positive finite endpoints"):
        Exponential(l0, l1, 10)


def test_bad_steps_and_iterations():
    with pytest.raises(ValueError, match="positive int"):
        Cosine(1.0, 0.0, 0)
    with pytest.raises(ValueError, match=">= 0"):
        Constant(1.0)(-1)
