"""Pareto fronts of forgetting against utility, and which family of runs has the better front.

Forgetting is scored so that *lower* is better (probe recall, WMDP accuracy) and utility so that
*higher* is better (recovery %). Everything here is a pure function of the points, so the answer
to "is reshaping the gradient better than the best loss weighting?" can be tested exhaustively.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Point = tuple[float, float]  # (forget score: lower is better, utility: higher is better)


def _finite(point: Point) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in point)


def dominates(a: Point, b: Point) -> bool:
    """True when ``a`` is at least as good as ``b`` in both objectives and strictly better in one."""
    no_worse = a[0] <= b[0] and a[1] >= b[1]
    strictly = a[0] < b[0] or a[1] > b[1]
    return no_worse and strictly


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points, sorted by forget score (utility then ascends along it).

    Points with a NaN/inf coordinate never enter the front (a failed evaluation is not a trade-off).
    Identical points do not dominate each other, so duplicates on the front are all kept.
    """
    candidates = [i for i, p in enumerate(points) if _finite(p)]
    front = [i for i in candidates if not any(dominates(points[j], points[i]) for j in candidates if j != i)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


def front_dominates(front_a: Sequence[Point], front_b: Sequence[Point], margin: Point = (0.0, 0.0)) -> bool:
    """True when every point of ``front_b`` is weakly dominated by some point of ``front_a``, and
    at least one is strictly dominated (so two identical fronts do not dominate each other).

    ``margin`` = (forget, utility) differences too small to count (measurement noise): within it a
    point counts as covered, and "strictly" means better by more than the margin in one objective.
    """
    a = [p for p in front_a if _finite(p)]
    b = [p for p in front_b if _finite(p)]
    if not a or not b:
        return False
    m_forget, m_utility = margin

    def weakly(p: Point, q: Point) -> bool:
        return p[0] <= q[0] + m_forget and p[1] >= q[1] - m_utility

    def clearly(p: Point, q: Point) -> bool:
        return weakly(p, q) and (p[0] < q[0] - m_forget or p[1] > q[1] + m_utility)

    every_covered = all(any(weakly(p, q) for p in a) for q in b)
    some_strict = any(any(clearly(p, q) for p in a) for q in b)
    return every_covered and some_strict


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Area dominated by ``points`` and bounded by ``reference`` (worst forget score, worst utility).

    A single number to rank fronts that do not dominate each other; points outside the reference
    box contribute only their part inside it.
    """
    ref_x, ref_y = reference
    inside = [p for p in points if _finite(p) and p[0] < ref_x and p[1] > ref_y]
    if not inside:
        return 0.0
    front = [inside[i] for i in pareto_front(inside)]
    area = 0.0
    # The front is sorted by forget score with utility ascending, so between two front points the
    # highest utility reached is that of the left one.
    for k, (x, y) in enumerate(front):
        next_x = front[k + 1][0] if k + 1 < len(front) else ref_x
        area += (next_x - x) * (y - ref_y)
    return area


@dataclass(frozen=True)
class FamilyComparison:
    """Fronts of each family, their hypervolumes and which families' fronts dominate which."""

    fronts: dict[str, list[int]]  # family -> indices (into the input points) of its own front
    hypervolumes: dict[str, float]
    dominance: list[tuple[str, str]]  # (winner, loser): winner's front dominates loser's
    best: str | None  # family whose front dominates every other one, if any
    reference: Point
    margin: Point = (0.0, 0.0)  # differences treated as noise when comparing fronts

    def verdict(self, baseline: str = "sum") -> str:
        """One or two sentences answering: does reshaping the gradient beat the best loss weighting?"""
        parts: list[str] = []
        if self.margin != (0.0, 0.0):
            parts.append(
                f"(Differences below {self.margin[0]:g} in forget score or {self.margin[1]:g} points of "
                "utility count as ties.)"
            )
        if self.best is not None:
            parts.append(f"The {self.best} front dominates every other family's front.")
        elif self.dominance:
            pairs = ", ".join(f"{w} over {loser}" for w, loser in self.dominance)
            parts.append(f"Front dominance: {pairs}; no family dominates all others.")
        else:
            parts.append("No family's front dominates another's.")
        ranked = sorted(self.hypervolumes.items(), key=lambda kv: -kv[1])
        parts.append(
            "Hypervolume (larger is better): " + ", ".join(f"{fam} {hv:.4g}" for fam, hv in ranked) + "."
        )
        if baseline in self.fronts and len(self.fronts) > 1:
            beats = [w for w, loser in self.dominance if loser == baseline]
            if beats:
                parts.append(f"Reshaping beats the best `{baseline}` loss weighting: {', '.join(beats)}.")
            else:
                parts.append(f"No reshaping family dominates the best `{baseline}` loss weighting.")
        return " ".join(parts)


def compare_families(
    points: Sequence[Point], families: Sequence[str], margin: Point = (0.0, 0.0)
) -> FamilyComparison:
    """Group points by family, compute each family's own front and the pairwise dominance.

    ``margin`` (forget, utility): differences that small are ties, so noise never decides a verdict.
    """
    if len(points) != len(families):
        raise ValueError(f"{len(points)} points but {len(families)} family labels")
    finite = [p for p in points if _finite(p)]
    reference: Point = (
        (max(p[0] for p in finite) + 1e-9, min(p[1] for p in finite) - 1e-9) if finite else (0.0, 0.0)
    )
    grouped: dict[str, list[int]] = {}
    for i, fam in enumerate(families):
        grouped.setdefault(fam, []).append(i)
    fronts: dict[str, list[int]] = {}
    for fam, idx in grouped.items():
        local = pareto_front([points[i] for i in idx])
        fronts[fam] = [idx[k] for k in local]
    hyper = {fam: hypervolume([points[i] for i in idx], reference) for fam, idx in fronts.items()}
    dominance = [
        (a, b)
        for a in fronts
        for b in fronts
        if a != b and front_dominates([points[i] for i in fronts[a]], [points[i] for i in fronts[b]], margin)
    ]
    others = set(fronts)
    best = next(
        (fam for fam in fronts if all((fam, o) in dominance for o in others - {fam}) and len(others) > 1),
        None,
    )
    return FamilyComparison(fronts, hyper, dominance, best, reference, margin)
