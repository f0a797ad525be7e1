"""Agreement with lm-evaluation-harness on SmolLM2: same prompts (lm-eval renders its own MMLU template
from local files), same per-choice log-likelihoods, same accuracy and stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from retainfirst.data import load_mmlu
from retainfirst.evals.mcq import build_prompt, evaluate_mcq

SUBJECT = "high_school_geography"
# As in lm-eval's mmlu_high_school_geography.yaml.
DESCRIPTION = "The following are multiple choice questions (with answers) about high school geography.\n\n"


def write_task(folder, test, dev) -> str:
    """lm-eval's own mmlu default template (read from the installed package), on local JSONL files."""
    import lm_eval

    template_path = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / "_default_template_yaml"
    config = yaml.safe_load(template_path.read_text())
    for name, questions in (("test", test), ("dev", dev)):
        rows = [
            {"question": q.question, "choices": q.choices, "answer": q.answer, "subject": q.subject}
            for q in questions
        ]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config.update(
        task="rf_mmlu_local",
        dataset_path="json",
        dataset_kwargs={"data_files": {"test": str(folder / "test.jsonl"), "dev": str(folder / "dev.jsonl")}},
        description=DESCRIPTION,
    )
    (folder / "rf_mmlu_local.yaml").write_text(yaml.safe_dump(config))
    return "rf_mmlu_local"


@pytest.mark.slow
def test_letter_scores_agree_with_lm_eval_harness(smollm2, tmp_path):
    lm_eval = pytest.importorskip(
        "lm_eval", reason="lm-eval is not installed (pip install 'retainfirst[lm-eval]')"
    )
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = smollm2
    questions = load_mmlu(subjects=[SUBJECT])
    dev, test = questions[:1], questions[1:13]
    task = write_task(tmp_path, test, dev)

    ours = evaluate_mcq(model, tokenizer, test, shots=1, fewshot_pool=dev, batch_size=8)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=1,
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    samples = sorted(output["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == len(test)
    for sample, mine, question in zip(samples, ours.samples, test, strict=True):
        # lm-eval rendered exactly our prompt, with the continuations " A".." D".
        assert [tuple(arg) for arg in sample["arguments"]] == [
            (build_prompt(question, dev), " " + letter) for letter in "ABCD"
        ]
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert mine["scores"] == pytest.approx(theirs, abs=2e-3)
    assert ours.metrics["acc"] == pytest.approx(output["results"][task]["acc,none"])
    assert ours.metrics["acc_stderr"] == pytest.approx(output["results"][task]["acc_stderr,none"])
