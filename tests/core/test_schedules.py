import itertools
import math

import pytest

from maxq.core.schedules import SCHEDULES, dense_fraction, ramp_fraction

RAMPS = [(0, 30), (5, 12), (0, 1)]


@pytest.mark.parametrize("name", sorted(set(SCHEDULES) - {"none"}))
@pytest.mark.parametrize("start, end", RAMPS)
def test_endpoints(name, start, end):
    assert dense_fraction(name, start, start, end) == 1.0
    assert dense_fraction(name, end, start, end) == 0.0
    assert dense_fraction(name, end + 7, start, end) == 0.0
    if start > 0:
        assert dense_fraction(name, 0, start, end) == 1.0


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("per_step", [False, True])
def test_monotone_non_increasing(name, per_step):
    ts = [i / 10 for i in range(0, 400)]
    ps = [dense_fraction(name, t, 0, 30, per_step=per_step) for t in ts]
    assert all(0.0 <= p <= 1.0 for p in ps)
    assert all(a >= b for a, b in itertools.pairwise(ps))


def test_none_is_plain_nm_from_step_zero():
    assert dense_fraction("none", 0, 0, 30) == 0.0


def test_shapes_match_formulas():
    assert dense_fraction("linear", 15, 0, 30) == pytest.approx(0.5)
    assert dense_fraction("cubic", 15, 0, 30) == pytest.approx(0.125)
    assert dense_fraction("cos", 15, 0, 30) == pytest.approx(math.cos(math.pi / 4))
    b = 0.05
    expected = 1 - (1 - math.exp(-b * 15)) / (1 - math.exp(-b * 30))
    assert dense_fraction("exp", 15, 0, 30) == pytest.approx(expected)


def test_staircase_floors_progress_and_smooth_does_not():
    assert dense_fraction("linear", 1.9, 0, 4) == pytest.approx(0.75)
    assert dense_fraction("linear", 1.9, 0, 4, per_step=True) == pytest.approx(1 - 1.9 / 4)
    assert dense_fraction("linear", 0.99, 0, 30) == 1.0  # epoch 0 is fully dense


def test_zero_length_ramp_is_a_step():
    assert ramp_fraction(2.9, 3, 3) == 0.0
    assert ramp_fraction(3.0, 3, 3) == 1.0


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        dense_fraction("quadratic", 1, 0, 30)
