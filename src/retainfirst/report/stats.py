"""Uncertainty of the headline scores: bootstrap confidence intervals over items and seeds, paired tests.

A configuration (one synthesizer with one set of settings) is trained once per seed; each run is
scored on the same evaluation items (probes, questions). Its forget score and utility are means
over items, averaged over seeds, so both sources of noise are resampled together
(a two-way bootstrap for this crossed design): each replicate draws the items of every headline
with replacement (one draw shared by every run and configuration, which pairs the comparisons)
and, independently per configuration, the seeds.

- :func:`estimate` gives a configuration's mean and percentile interval (forget score, utility);
- :func:`compare` the paired difference of two configurations with its interval and a two-sided
  paired-bootstrap p-value (Koehn 2004; the p-value inverts the percentile interval, so p < 1 - level
  exactly when the interval excludes 0), plus a Wilcoxon signed-rank test (scipy) per headline on
  the per-item differences averaged over seeds;
- :func:`holm` adjusts the p-values of several comparisons (family-wise error).

Headlines without per-item scores (e.g. perplexity, or a task that keeps only some samples) still
count in the scores, but only their variation over seeds is resampled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import EvalTask, Headline
from retainfirst.report.scores import default_tasks, forget_score, headline_metrics, recovery, utility

SCORES = ("forget", "utility")  # forget score (lower = more forgotten), utility (mean recovery %)


@dataclass(frozen=True)
class Measurement:
    """One run's headline values and, where every item's score was kept, the per-item scores."""

    values: Mapping[str, float]
    items: Mapping[str, np.ndarray] = field(default_factory=dict)  # headline key -> scores (fixed order)


@dataclass(frozen=True)
class Estimate:
    """A mean with its percentile interval (``low``/``high`` None when nothing varies to resample)."""

    mean: float
    low: float | None
    high: float | None
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "confidence": self.confidence}

    def interval_text(self, fmt: str = "{:.1f}") -> str:
        if self.low is None or self.high is None:
            return "no CI"
        return f"{100 * self.confidence:g} % CI {fmt.format(self.low)} to {fmt.format(self.high)}"


@dataclass(frozen=True)
class Comparison:
    """``a`` minus ``b`` on one score: the paired difference, its interval and p-values."""

    a: str
    b: str
    score: str
    difference: Estimate
    p_value: float | None  # paired bootstrap, two-sided; None when nothing varies
    per_headline: dict[str, dict[str, float | None]] = field(default_factory=dict)  # Wilcoxon per headline
    p_adjusted: float | None = None  # Holm over the comparisons of a report

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "score": self.score,
            "difference": self.difference.to_dict(),
            "p_value": self.p_value,
            "p_holm": self.p_adjusted,
            "test": "paired bootstrap over items and seeds (two-sided)",
            "per_headline_wilcoxon": self.per_headline,
        }


# ---- building measurements from evaluation results ------------------------------------------------


def item_scores(result: EvalResult) -> list[float] | None:
    """Per-item scores of ``result`` from its samples (``score``, else ``correct``), or None unless
    there is one for every item (tasks may keep only the first samples)."""
    scores: list[float] = []
    for sample in result.samples:
        value = sample.get("score", sample.get("correct")) if isinstance(sample, Mapping) else None
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return None
        scores.append(float(value))
    return scores if scores and len(scores) == result.n else None


def measure(results: Sequence[EvalResult], tasks: Sequence[EvalTask] | None = None) -> Measurement:
    """Headline values of ``results`` and, for each headline whose results all have per-item scores
    that reproduce its value, those scores (concatenated in result order)."""
    tasks = default_tasks() if tasks is None else list(tasks)
    values = headline_metrics(results, tasks)
    claimed: dict[str, tuple[Headline, list[EvalResult]]] = {}
    for result in results:
        headline = next((h for t in tasks if (h := t.headline_for(result)) is not None), None)
        if headline is not None and headline.key in values:
            claimed.setdefault(headline.key, (headline, []))[1].append(result)
    items: dict[str, np.ndarray] = {}
    for key, (headline, group) in claimed.items():
        chosen = group if headline.pool else group[-1:]
        per_result = [item_scores(r) for r in chosen]
        if any(s is None for s in per_result):
            continue
        scores = np.array([x for s in per_result for x in s], dtype=np.float64)  # type: ignore[union-attr]
        if scores.size and abs(scores.mean() - values[key]) <= 1e-9 * max(1.0, abs(values[key])):
            items[key] = scores
    return Measurement(values, items)


# ---- the scores of a run, vectorised over bootstrap replicates -----------------------------------


def run_scores(values: Mapping[str, Any], before: Mapping[str, float], headlines: Sequence[Headline]) -> dict:
    """Forget score and utility of one run from headline values (floats or arrays of replicates)."""
    forget = [h for h in headlines if h.role == "forget" and h.key in values]
    if forget:
        top = max(h.precedence for h in forget)
        chosen = [values[h.key] for h in forget if h.precedence == top]
        forget_value: Any = sum(chosen) / len(chosen)
    else:
        forget_value = math.nan
    recoveries = []
    for h in headlines:
        b, a = before.get(h.key), values.get(h.key)
        if h.role != "utility" or b is None or a is None or not math.isfinite(b):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            recoveries.append(100.0 * np.asarray(a) / b if h.higher_is_better else 100.0 * b / np.asarray(a))
    utility_value: Any = sum(recoveries) / len(recoveries) if recoveries else math.nan
    return {"forget": forget_value, "utility": utility_value}


def point_scores(
    runs: Sequence[Measurement], before: Mapping[str, float], headlines: Sequence[Headline]
) -> dict[str, float]:
    """Mean over runs (seeds) of each run's forget score and utility, as in the results table."""
    out = {}
    for score in SCORES:
        per_run = []
        for run in runs:
            if score == "forget":
                per_run.append(forget_score(run.values, headlines))
            else:
                per_run.append(utility(recovery(before, run.values, headlines)))
        finite = [v for v in per_run if math.isfinite(v)]
        out[score] = sum(finite) / len(finite) if finite and len(finite) == len(per_run) else math.nan
    return out


def shared_item_counts(groups: Sequence[Sequence[Measurement]]) -> dict[str, int]:
    """Headlines with per-item scores of the same length in every run of every group."""
    runs = [run for group in groups for run in group]
    if not runs:
        return {}
    keys = set(runs[0].items)
    for run in runs[1:]:
        keys &= set(run.items)
    counts = {}
    for key in sorted(keys):
        lengths = {len(run.items[key]) for run in runs}
        if len(lengths) == 1:
            counts[key] = lengths.pop()
    return counts


def draw_items(counts: Mapping[str, int], resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {key: rng.integers(0, n, size=(resamples, n)) for key, n in counts.items()}


def replicate_scores(
    runs: Sequence[Measurement],
    before: Mapping[str, float],
    headlines: Sequence[Headline],
    item_draws: Mapping[str, np.ndarray],
    seed_draws: np.ndarray,
) -> dict[str, np.ndarray]:
    """Each score of the group in every replicate: per run from the drawn items, then the mean over
    the drawn runs (``seed_draws``: [resamples, runs] indices)."""
    resamples = seed_draws.shape[0]
    per_run: dict[str, list[np.ndarray]] = {score: [] for score in SCORES}
    for run in runs:
        values: dict[str, Any] = {}
        for key, value in run.values.items():
            if key in item_draws:
                values[key] = run.items[key][item_draws[key]].mean(axis=1)
            else:
                values[key] = np.full(resamples, float(value))
        scores = run_scores(values, before, headlines)
        for score in SCORES:
            per_run[score].append(np.broadcast_to(np.asarray(scores[score], dtype=np.float64), (resamples,)))
    out = {}
    for score in SCORES:
        matrix = np.stack(per_run[score], axis=1)  # [resamples, runs]
        out[score] = np.take_along_axis(matrix, seed_draws, axis=1).mean(axis=1)
    return out


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float] | None:
    """The central ``confidence`` interval of the replicates (None when they are all equal or not finite)."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size < replicates.size or finite.size == 0 or np.ptp(finite) == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_p_value(differences: np.ndarray) -> float | None:
    """Two-sided p-value of "no difference" from bootstrap replicates of a difference:
    2 x the smaller share of replicates on either side of 0 (each count +1, so never 0)."""
    finite = differences[np.isfinite(differences)]
    if finite.size < differences.size or finite.size == 0 or np.ptp(finite) == 0:
        return None
    total = finite.size + 1
    below = (np.count_nonzero(finite <= 0) + 1) / total
    above = (np.count_nonzero(finite >= 0) + 1) / total
    return float(min(1.0, 2 * min(below, above)))


def wilcoxon_p(differences: np.ndarray) -> float:
    """Wilcoxon signed-rank p-value (two-sided, zero differences dropped); 1.0 when all are zero."""
    from scipy.stats import wilcoxon

    nonzero = differences[differences != 0]
    if nonzero.size == 0:
        return 1.0
    return float(wilcoxon(nonzero).pvalue)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (None entries are skipped and stay None)."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    m = len(present)
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


# ---- the two things the report asks for -----------------------------------------------------------


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def estimate(
    runs: Sequence[Measurement],
    before: Mapping[str, float],
    headlines: Sequence[Headline],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    item_counts: Mapping[str, int] | None = None,
) -> dict[str, Estimate]:
    """Mean and bootstrap interval of the forget score and utility of one configuration's runs."""
    counts = shared_item_counts([runs]) if item_counts is None else item_counts
    items = draw_items(counts, resamples, _rng(seed, 0))
    seeds = _rng(seed, 1).integers(0, len(runs), size=(resamples, len(runs)))
    replicates = replicate_scores(runs, before, headlines, items, seeds)
    point = point_scores(runs, before, headlines)
    out = {}
    for score in SCORES:
        interval = percentile_interval(replicates[score], confidence) if math.isfinite(point[score]) else None
        low, high = interval if interval else (None, None)
        out[score] = Estimate(point[score], low, high, confidence)
    return out


def compare(
    a: Sequence[Measurement],
    b: Sequence[Measurement],
    before: Mapping[str, float],
    headlines: Sequence[Headline],
    *,
    names: tuple[str, str] = ("a", "b"),
    score: str = "utility",
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """``a`` minus ``b`` on ``score``, paired over items (same draws) with seeds resampled per side."""
    counts = shared_item_counts([a, b])
    items = draw_items(counts, resamples, _rng(seed, 0))
    draws_a = _rng(seed, 1).integers(0, len(a), size=(resamples, len(a)))
    draws_b = _rng(seed, 2).integers(0, len(b), size=(resamples, len(b)))
    diff = (
        replicate_scores(a, before, headlines, items, draws_a)[score]
        - replicate_scores(b, before, headlines, items, draws_b)[score]
    )
    point = point_scores(a, before, headlines)[score] - point_scores(b, before, headlines)[score]
    interval = percentile_interval(diff, confidence) if math.isfinite(point) else None
    low, high = interval if interval else (None, None)
    roles = {"forget": "forget", "utility": "utility"}[score]
    per_headline: dict[str, dict[str, float | None]] = {}
    for h in headlines:
        if h.role != roles or h.key not in counts:
            continue
        mean_a = np.mean([run.items[h.key] for run in a], axis=0)
        mean_b = np.mean([run.items[h.key] for run in b], axis=0)
        d = mean_a - mean_b
        per_headline[h.key] = {"difference": float(d.mean()), "p_wilcoxon": wilcoxon_p(d), "n": float(d.size)}
    return Comparison(
        names[0],
        names[1],
        score,
        Estimate(point, low, high, confidence),
        bootstrap_p_value(diff) if math.isfinite(point) else None,
        per_headline,
    )


def with_holm(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons with their Holm-adjusted p-values filled in."""
    from dataclasses import replace

    adjusted = holm([c.p_value for c in comparisons])
    return [replace(c, p_adjusted=p) for c, p in zip(comparisons, adjusted, strict=True)]


def format_p(p: float | None) -> str:
    if p is None:
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def comparison_sentence(c: Comparison, significance: float = 0.05, label: str | None = None) -> str:
    """e.g. ``sago vs sum: utility +3.1 points (95 % CI -0.5 to 6.7), p = 0.09: not significant at 0.05.``"""
    d = c.difference
    what = label or ("utility" if c.score == "utility" else "forget score")
    unit, fmt = (" points", "{:+.1f}") if c.score == "utility" else ("", "{:+.3f}")
    head = f"{c.a} vs {c.b}: {what} {fmt.format(d.mean)}{unit}"
    if c.p_value is None:
        return f"{head} (no CI: one seed and no per-item scores); cannot be tested."
    interval = d.interval_text(fmt.replace("+", ""))
    decisive = c.p_adjusted if c.p_adjusted is not None else c.p_value
    p_text = format_p(c.p_value)
    if c.p_adjusted is not None and c.p_adjusted != c.p_value:
        p_text += f" (Holm-adjusted: {format_p(c.p_adjusted)})"
    verdict = "significant" if decisive < significance else "not significant"
    return f"{head} ({interval}), {p_text}: {verdict} at {significance:g}."
