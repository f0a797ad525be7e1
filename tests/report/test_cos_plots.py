"""cos-vs-recovery: each run's mean and minimum over training, for cos(u, g_r) and cos(delta theta, g_r)."""

import math

import numpy as np
import pytest

from retainfirst.report.plots import (
    CURVE_METRICS,
    RECOVERY_COSINES,
    cos_vs_recovery_figure,
    cosine_ranges,
    plot_cos_vs_recovery,
)
from retainfirst.report.scores import RunSummary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records() -> list[dict]:
    """'sum' ends positive (+0.22) after negative steps; 'sago' never goes below 0.1."""
    sum_update = [-0.5, -0.25, -0.25, 0.22]
    sago_update = [0.1, 0.3, 0.5, 0.7]
    rows = [
        {"run": "sum", "step": s + 1, "cos_update_retain": u, "cos_step_retain": u / 2}
        for s, u in enumerate(sum_update)
    ]
    rows += [{"run": "sago", "step": s + 1, "cos_update_retain": u} for s, u in enumerate(sago_update)]
    rows.append({"run": "sago", "step": 5, "cos_update_retain": None, "cos_step_retain": math.nan})
    return rows


def summaries() -> list[RunSummary]:
    return [
        RunSummary("sum", "sum", {}, recovery={"mmlu": 80.0}, final_stats={"cos_update_retain": 0.22}),
        RunSummary("sago", "sago", {}, recovery={"mmlu": 95.0}, final_stats={"cos_update_retain": 0.7}),
    ]


def drawn(ax) -> list[tuple[float, float]]:
    """The (x, y) of every scatter point on ``ax``, rounded to 9 digits and sorted."""
    return sorted(
        (round(float(x), 9), float(y)) for c in ax.collections for x, y in np.asarray(c.get_offsets())
    )


def test_cosine_ranges_are_mean_and_minimum_over_steps():
    ranges = cosine_ranges(records())
    assert ranges["sum"]["cos_update_retain"] == pytest.approx((-0.195, -0.5))
    assert ranges["sum"]["cos_step_retain"] == pytest.approx((-0.0975, -0.25))
    assert ranges["sago"] == {"cos_update_retain": pytest.approx((0.4, 0.1))}  # null/NaN steps left out


def test_each_run_is_drawn_at_its_mean_and_minimum(tmp_path):
    fig = cos_vs_recovery_figure(summaries(), records(), "t")
    assert [ax.get_xlabel().split(" (")[0] for ax in fig.axes] == list(RECOVERY_COSINES.values())
    update_ax, step_ax = fig.axes
    assert drawn(update_ax) == [(-0.5, 80.0), (-0.195, 80.0), (0.1, 95.0), (0.4, 95.0)]
    assert drawn(step_ax) == [(-0.25, 80.0), (-0.0975, 80.0)]  # sago logged no step cosines
    path = plot_cos_vs_recovery(summaries(), tmp_path / "cos.png", records=records())
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_without_records_the_last_value_is_drawn(tmp_path):
    fig = cos_vs_recovery_figure(summaries(), None, "t")
    assert drawn(fig.axes[0]) == [(0.22, 80.0), (0.22, 80.0), (0.7, 95.0), (0.7, 95.0)]
    assert "last step" in fig.axes[0].get_xlabel()


def test_training_curves_include_the_step_cosines():
    assert {"cos_step_retain", "cos_step_forget", "cos_update_retain"} <= set(CURVE_METRICS)
