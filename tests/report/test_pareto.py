import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retainfirst.report.pareto import (
    compare_families,
    dominates,
    front_dominates,
    hypervolume,
    pareto_front,
)


def brute_front(points):
    """Reference: a point is on the front iff no other point is <= in forget, >= in utility, != it."""
    out = []
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        beaten = any(
            (u <= x and v >= y and (u, v) != (x, y))
            for j, (u, v) in enumerate(points)
            if j != i and math.isfinite(u) and math.isfinite(v)
        )
        if not beaten:
            out.append(i)
    return sorted(out)


def test_dominates_is_strict():
    assert dominates((0.1, 90), (0.2, 80))
    assert dominates((0.1, 90), (0.1, 80))
    assert dominates((0.1, 90), (0.2, 90))
    assert not dominates((0.1, 90), (0.1, 90))
    assert not dominates((0.1, 80), (0.2, 90))


def test_front_simple_tradeoff_sorted_by_forget():
    pts = [(0.5, 99.0), (0.1, 60.0), (0.3, 70.0), (0.3, 95.0), (0.6, 98.0)]
    assert pareto_front(pts) == [1, 3, 0]


def test_front_keeps_duplicates_and_skips_nan():
    pts = [(0.2, 80.0), (0.2, 80.0), (math.nan, 100.0), (0.1, math.inf)]
    assert pareto_front(pts) == [0, 1]


def test_empty_and_single():
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]


def test_front_exhaustive_on_small_grids():
    values = [0.0, 1.0, 2.0]
    grid = list(itertools.product(values, values))
    for n in range(1, 4):
        for pts in itertools.product(grid, repeat=n):
            assert sorted(pareto_front(list(pts))) == brute_front(list(pts)), pts


@given(st.lists(st.tuples(st.floats(-5, 5, allow_nan=False), st.floats(-5, 5, allow_nan=False)), max_size=12))
def test_front_matches_brute_force(pts):
    front = pareto_front(pts)
    assert sorted(front) == brute_front(pts)
    xs = [pts[i][0] for i in front]
    assert xs == sorted(xs)
    # Along the front, giving up forgetting must buy utility: utility never decreases.
    ys = [pts[i][1] for i in front]
    assert all(a <= b for a, b in itertools.pairwise(ys))


def test_front_dominates():
    a = [(0.1, 90.0), (0.3, 95.0)]
    b = [(0.2, 85.0), (0.4, 94.0)]
    assert front_dominates(a, b)
    assert not front_dominates(b, a)
    assert not front_dominates(a, a)
    assert not front_dominates(a, [])
    # Crossing fronts: neither dominates.
    c = [(0.05, 80.0), (0.5, 99.0)]
    assert not front_dominates(a, c) and not front_dominates(c, a)


def test_hypervolume_rectangles():
    assert hypervolume([(1.0, 3.0)], reference=(3.0, 0.0)) == pytest.approx(6.0)
    # Two steps: [1,2]x[0,3] + [2,3]x[0,4].
    assert hypervolume([(1.0, 3.0), (2.0, 4.0)], reference=(3.0, 0.0)) == pytest.approx(3.0 + 4.0)
    # Dominated points add nothing; points outside the box add nothing.
    assert hypervolume([(1.0, 3.0), (2.0, 2.0), (4.0, 9.0)], reference=(3.0, 0.0)) == pytest.approx(6.0)
    assert hypervolume([], reference=(1.0, 0.0)) == 0.0


def test_compare_families_names_dominating_family():
    pts = [(0.5, 60.0), (0.3, 40.0), (0.2, 90.0), (0.1, 80.0), (0.4, 85.0)]
    fams = ["sum", "sum", "sago", "sago", "pcgrad"]
    cmp = compare_families(pts, fams)
    assert cmp.fronts == {"sum": [1, 0], "sago": [3, 2], "pcgrad": [4]}
    assert ("sago", "sum") in cmp.dominance
    assert ("sago", "pcgrad") in cmp.dominance
    assert ("sum", "sago") not in cmp.dominance
    assert cmp.best == "sago"
    assert cmp.hypervolumes["sago"] > cmp.hypervolumes["sum"]
    text = cmp.verdict()
    assert "sago front dominates every other" in text
    assert "beats the best `sum` loss weighting: sago" in text


def test_compare_families_no_dominance():
    pts = [(0.1, 50.0), (0.5, 99.0)]
    cmp = compare_families(pts, ["sum", "sago"])
    assert cmp.dominance == [] and cmp.best is None
    assert "No family's front dominates" in cmp.verdict()
    assert "No reshaping family dominates" in cmp.verdict()


def test_compare_families_length_mismatch():
    with pytest.raises(ValueError, match="2 points but 1"):
        compare_families([(0, 0), (1, 1)], ["a"])


def test_margin_turns_noise_sized_differences_into_ties():
    a, b = [(0.50, 100.3)], [(0.50, 100.0)]
    assert front_dominates(a, b)
    assert not front_dominates(a, b, margin=(0.02, 1.0))
    assert not front_dominates(b, a, margin=(0.02, 1.0))
    # a clear win still counts, and a point only slightly worse than the winner stays covered
    assert front_dominates([(0.20, 99.5)], [(0.60, 100.0)], margin=(0.02, 1.0))
    assert not front_dominates([(0.20, 97.0)], [(0.60, 100.0)], margin=(0.02, 1.0))


def test_compare_families_with_margin_reports_no_winner_on_noise():
    comparison = compare_families([(0.5, 100.0), (0.5, 100.2)], ["sum", "sago"], margin=(0.02, 1.0))
    assert comparison.dominance == []
    assert comparison.best is None
    assert "count as ties" in comparison.verdict()
