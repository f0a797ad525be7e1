import json
import math
import random

import pytest
from rich.console import Console

from retainfirst.evals.results import EvalResult
from retainfirst.io import atomic_write_json
from retainfirst.report import (
    RunSummary,
    format_table,
    headline_metrics,
    markdown_table,
    plot_cos_vs_recovery,
    plot_pareto,
    plot_training_curves,
    recovery,
    summarize_run,
    write_summary_md,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(forget, neighbor, mmlu, ppl):
    return [
        EvalResult("forget_fb", {"rougeL_recall": forget[0]}, n=10),
        EvalResult("forget_qa", {"rougeL_recall": forget[1]}, n=30),
        EvalResult("neighbor_fb", {"rougeL_recall": neighbor}, n=5),
        EvalResult("mmlu", {"acc": mmlu}, n=50),
        EvalResult("perplexity", {"perplexity": ppl}, n=8),
    ]


def test_headline_metrics_pool_probes_by_count():
    m = headline_metrics(_results((1.0, 0.0), 0.8, 0.4, 12.0))
    assert m["forget"] == pytest.approx(10 / 40)
    assert m == pytest.approx({"forget": 0.25, "neighbor": 0.8, "mmlu": 0.4, "ppl": 12.0})


def test_recovery_inverts_perplexity():
    rec = recovery({"neighbor": 0.8, "mmlu": 0.4, "ppl": 10.0}, {"neighbor": 0.4, "mmlu": 0.4, "ppl": 20.0})
    assert rec == pytest.approx({"neighbor": 50.0, "mmlu": 100.0, "ppl": 50.0})
    assert recovery({"mmlu": 0.5}, {"neighbor": 0.1}) == {}


def test_summarize_run_and_utility():
    before = headline_metrics(_results((0.9, 0.9), 0.8, 0.4, 10.0))
    run = summarize_run(
        "sago", "sago", before, _results((0.1, 0.1), 0.4, 0.2, 20.0), {"cos_update_retain": 0.7}
    )
    assert run.forget_score == pytest.approx(0.1)
    assert run.utility == pytest.approx(50.0)
    d = run.to_dict()
    assert d["final_stats"]["cos_update_retain"] == 0.7 and d["utility"] == pytest.approx(50.0)


def test_wmdp_forget_score_without_probes():
    r = RunSummary("x", "sum", {"wmdp_bio": 0.3, "wmdp_cyber": 0.5, "mmlu": 0.5})
    assert r.forget_score == pytest.approx(0.4)
    assert math.isnan(RunSummary("y", "sum", {"mmlu": 0.5}).forget_score)


def _rows():
    before = RunSummary("before", "before", {"forget": 0.9, "neighbor": 0.8, "mmlu": 0.4, "ppl": 10.0})
    runs = []
    for i, fam in enumerate(["sum", "sum", "pcgrad", "sago", "sago"]):
        after = {"forget": 0.1 + 0.1 * i, "neighbor": 0.3 + 0.1 * i, "mmlu": 0.35, "ppl": 11.0 + i}
        runs.append(
            RunSummary(
                f"{fam}-{i}", fam, after, recovery(before.metrics, after), {"cos_update_retain": 0.1 * i}
            )
        )
    return before, runs


def test_tables_have_same_cells():
    before, runs = _rows()
    table = format_table([before, *runs], title="demo")
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "sago-3" in text and "rec. MMLU %" in text and "87.5" in text
    md = markdown_table([before, *runs])
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 1 + len(runs)
    assert lines[0].startswith("| run | forget ↓ |")
    # The before row has no recovery; missing values show as a dash.
    assert "–" in lines[2]


def test_report_files_written(tmp_path):
    before, runs = _rows()
    rng = random.Random(0)
    records = [
        {
            "run": r.name,
            "step": s,
            "forget_loss": rng.random(),
            "retain_loss": rng.random(),
            "cos_forget_retain": rng.uniform(-1, 1),
            "cos_update_retain": rng.uniform(-1, 1),
            "conflict_fraction": rng.random(),
        }
        for r in runs
        for s in range(1, 6)
    ]
    paths = [
        plot_pareto(runs, tmp_path / "pareto.png", before=before),
        plot_training_curves(records, tmp_path / "curves.png"),
        plot_cos_vs_recovery(runs, tmp_path / "cos.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    summary = write_summary_md(
        tmp_path / "summary.md",
        [before, *runs],
        title="t",
        verdict="The sago front dominates.",
        plots={"Pareto": "pareto.png"},
        rerun="retainfirst run config.yaml",
    )
    text = summary.read_text()
    assert "| sago-4 |" in text and "![Pareto](pareto.png)" in text and "retainfirst run config.yaml" in text
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cos.png", "curves.png", "pareto.png", "summary.md"]


def test_plots_tolerate_empty_and_nan(tmp_path):
    nan_run = RunSummary("bad", "sum", {"forget": math.nan})
    assert plot_pareto([nan_run], tmp_path / "p.png").stat().st_size > 0
    assert plot_pareto([], tmp_path / "e.png").stat().st_size > 0
    assert plot_training_curves([], tmp_path / "c.png").stat().st_size > 0
    assert plot_cos_vs_recovery([nan_run], tmp_path / "k.png").stat().st_size > 0


def test_atomic_json_writes_nan_as_null(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"a": math.nan, "b": [1.0, math.inf]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None]}
