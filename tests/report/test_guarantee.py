"""The optimizer-level guarantee table: cosines of u and of the weight change over training."""

from __future__ import annotations

import math

import pytest

from retainfirst.report.guarantee import cosine_summary, guarantee_rows, guarantee_table


def test_cosine_summary_counts_negative_steps_and_skips_missing_values():
    summary = cosine_summary([0.5, -0.25, None, math.nan, 0.0, 1.0])
    assert summary["steps"] == 4
    assert summary["mean"] == pytest.approx(1.25 / 4)
    assert summary["min"] == -0.25
    assert summary["negative_share"] == 0.25  # zero is not negative
    assert cosine_summary([None, math.inf]) == {"steps": 0, "mean": None, "min": None, "negative_share": None}


def test_rows_pool_every_step_of_every_seed_of_a_configuration():
    records = {
        "sago-s0": [
            {"step": 1, "cos_update_retain": 0.2, "cos_step_retain": -0.1},
            {"step": 2, "eval/forget": 0.3},  # an in-run evaluation record without cosines
            {"step": 2, "cos_update_retain": 0.4, "cos_step_retain": 0.3},
        ],
        "sago-s1": [{"step": 1, "cos_update_retain": 0.0, "cos_step_retain": -0.5}],
        "sum": [{"step": 1, "cos_update_retain": -0.6}],  # no step cosine logged
    }
    rows = guarantee_rows([("sago", ["sago-s0", "sago-s1"]), ("sum", ["sum"])], records)
    sago, total = rows
    assert sago["label"] == "sago"
    assert sago["cos_update_retain"] == {
        "steps": 3,
        "mean": pytest.approx(0.2),
        "min": 0.0,
        "negative_share": 0.0,
    }
    # the step cosine is shown for -Δθ (the descent direction, the sign convention of u)
    assert sago["cos_step_retain"]["steps"] == 3
    assert sago["cos_step_retain"]["min"] == -0.3
    assert sago["cos_step_retain"]["mean"] == pytest.approx(0.1)
    assert sago["cos_step_retain"]["negative_share"] == pytest.approx(1 / 3)
    assert total["cos_step_retain"]["steps"] == 0
    table = guarantee_table(rows)
    lines = table.strip().splitlines()
    assert lines[2] == "| sago | 3 | +0.200 | +0.000 | 0 % | +0.100 | -0.300 | 33 % |"
    assert lines[3] == "| sum | 1 | -0.600 | -0.600 | 100 % | – | – | – |"
