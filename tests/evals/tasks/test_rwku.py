from __future__ import annotations

import json

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import get_task
from retainfirst.experiment.prepare import source_builders


def _write_rwku(root):
    folder = root / "Target" / "1_Ada_Lovelace"
    folder.mkdir(parents=True)

    def probe(query, answer, level):
        return {"query": query, "answer": answer, "level": level, "type": "k", "subject": "Ada Lovelace"}

    files = {
        "passage.json": [{"text": "Ada Lovelace wrote the first program."}],
        "forget_level1.json": [probe("Ada Lovelace worked with ___.", "Babbage", "1")],
        "forget_level2.json": [probe("Who did Ada Lovelace work with?", "Babbage", "2")],
        "neighbor_level1.json": [probe("The Analytical Engine was designed by ___.", "Babbage", "1")],
    }
    for name, records in files.items():
        (folder / name).write_text(json.dumps(records))


def test_metadata_shares_the_probe_numbers():
    task = get_task("rwku")
    assert [h.key for h in task.headlines()] == ["forget", "neighbor"]
    assert task.headline_for(EvalResult("rwku_forget_qa", {}, 1)).key == "forget"
    assert task.headline_for(EvalResult("rwku_neighbor_fb", {}, 1)).key == "neighbor"
    assert task.headline_for(EvalResult("forget_qa", {}, 1)) is None


def test_prepares_prefixed_probe_families_and_runs(make_context, model, byte_tokenizer, data_dir):
    _write_rwku(data_dir)
    context = make_context(data={"rwku_forget_targets": "1-1"})
    context.builders = source_builders({})
    task = get_task("rwku")
    data = task.prepare(context)
    assert {k: len(v) for k, v in data["probes"].items() if v} == {
        "rwku_forget_fb": 1,
        "rwku_forget_qa": 1,
        "rwku_neighbor_fb": 1,
    }
    runnable = {"probes": {k: v for k, v in data["probes"].items() if v}, "settings": {}}
    results = task.run(model, byte_tokenizer, runnable, context.config.eval)
    assert [r.task for r in results] == ["rwku_forget_fb", "rwku_forget_qa", "rwku_neighbor_fb"]
