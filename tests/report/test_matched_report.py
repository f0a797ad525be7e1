"""The directory report at matched forgetting, written from synthetic results (no model is trained)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retainfirst.config import load_config, plan_runs
from retainfirst.evals.results import EvalResult, save_results
from retainfirst.evals.tasks import EvalTask, Headline, register_task, unregister_task
from retainfirst.experiment.during_training import EvidenceSettings, with_seeds
from retainfirst.experiment.report import ITEMS_FILE, save_items, write_report

FORGET = Headline("forget", "forget", "score", False, pool=True, precedence=1)
HELDOUT = Headline("heldout", "utility", "score", True, pool=True)


@pytest.fixture
def synthetic_task():
    @register_task("synthetic_probes")
    class SyntheticProbes(EvalTask):
        role = "forget"
        headline = "score"
        higher_is_better = False

        def headlines(self):
            return [FORGET, HELDOUT]

        def headline_for(self, result):
            return {"f": FORGET, "u": HELDOUT}.get(result.task[0])

    yield
    unregister_task("synthetic_probes")


def probes(task: str, scores: np.ndarray) -> EvalResult:
    samples = [{"score": float(s)} for s in scores]
    return EvalResult(task, {"score": float(scores.mean())}, n=len(scores), samples=samples)


def test_report_from_synthetic_runs(synthetic_task, tmp_path, capsys):
    config = load_config(None, ["synthesizers=[sum,sago]", "eval.tasks=[synthetic_probes]"])
    plan = with_seeds(plan_runs(config), [0, 1, 2])
    rng = np.random.default_rng(0)
    heldout = rng.uniform(0.3, 0.9, 50)
    out = tmp_path / "out"
    for sub in plan:
        run_dir = out / "runs" / sub.name
        shift = 0.06 if sub.family == "sago" else 0.0
        forget = np.clip(rng.uniform(0, 0.5, 48), 0, 1)
        results = [
            probes("f_fb", forget),
            probes("u_fb", np.clip(heldout + shift + rng.normal(0, 0.02, 50), 0, 1)),
        ]
        save_results(results, run_dir / "results.json")
        save_items(results, run_dir / ITEMS_FILE)
        records = [{"step": 1, "eval/forget": 0.6}, {"step": 2, "eval/forget": 0.25, "stopped": True}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before = [probes("f_fb", np.full(48, 0.9)), probes("u_fb", heldout)]
    evidence = EvidenceSettings(seeds=[0, 1, 2], forget_below=0.3, resamples=300)
    payload = write_report(out, config, plan, before, title="t", rerun="retainfirst run x", evidence=evidence)

    assert payload == json.loads((out / "results.json").read_text())
    evaluation = payload["evaluation"]
    assert evaluation["items_per_headline"] == {"forget": 48, "heldout": 50}
    assert evaluation["seeds"] == [0, 1, 2] and evaluation["runs_per_configuration"] == 3
    assert evaluation["matched_level"] == 0.3 and "forget score <= 0.3" in evaluation["stopping_rule"]
    matched = payload["matched"]
    sago = next(p for p in matched["configurations"] if p["label"] == "sago")
    assert sago["runs"] == ["sago-s0", "sago-s1", "sago-s2"] and sago["reached"]
    assert sago["utility"]["low"] < sago["utility"]["mean"] < sago["utility"]["high"]
    (comparison,) = matched["comparisons"]
    assert (comparison["a"], comparison["b"]) == ("sago", "sum")
    assert comparison["difference"]["low"] > 0 and comparison["p_value"] < 0.05
    assert comparison["per_headline_wilcoxon"]["heldout"]["p_wilcoxon"] < 0.001
    verdict = payload["comparison"]["verdict"]
    assert "- vs the configured sum: sago vs sum: utility +" in verdict and "significant at 0.05." in verdict
    summary = (out / "summary.md").read_text()
    assert "| sago | sago | 3 | yes (step 2, 2, 2) |" in summary
    assert "Items per number: forget 48, heldout 50. Seeds: 0, 1, 2." in summary
    assert (out / "matched.png").read_bytes().startswith(b"\x89PNG")
    assert "report written to" in capsys.readouterr().out
