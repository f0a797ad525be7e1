from __future__ import annotations

import builtins
import json

import pytest
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.evals.lm_eval_bridge import convert_lm_eval_results, import_lm_eval, run_lm_eval

DOCS = [
    {"question": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"question": "Two plus two is", "choices": ["five", "four"], "label": 1},
    {"question": "Water is", "choices": ["wet", "dry"], "label": 0},
    {"question": "Fire is", "choices": ["cold", "hot"], "label": 1},
]


def write_task(folder):
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (folder / "rf_tiny_choice.yaml").write_text(
        "task: rf_tiny_choice\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def brute_force_accuracy(model, tokenizer):
    """Sum of log p(" " + choice | question) per choice, argmax vs label (one text at a time)."""
    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            context = tokenizer(doc["question"])["input_ids"]
            totals = []
            for choice in doc["choices"]:
                full = tokenizer(doc["question"] + " " + choice)["input_ids"]
                ids = torch.tensor([full])
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                picked = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)
                totals.append(picked[len(context) - 1 :].sum().item())
            correct += int(max(range(len(totals)), key=totals.__getitem__) == doc["label"])
    return correct / len(DOCS)


def test_absent_extra_gives_an_install_hint(monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(RetainFirstError, match=r"pip install 'retainfirst\[lm-eval\]'"):
        import_lm_eval()
    with pytest.raises(RetainFirstError, match="install the extra"):
        run_lm_eval(object(), tokenizer=object(), tasks=["mmlu"])


def test_convert_results_maps_metric_keys_and_counts():
    output = {
        "results": {
            "task_a": {"alias": "task_a", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 4},
            "task_b": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
            "group": {"acc,none": 0.4},
        },
        "n-samples": {"task_a": {"original": 10, "effective": 4}, "task_b": {"original": 8, "effective": 8}},
        "n-shot": {"task_a": 5, "task_b": 0},
        "versions": {"task_a": 1.0},
        "group_subtasks": {"group": ["task_a", "task_b"]},
    }
    results = {r.task: r for r in convert_lm_eval_results(output, {"limit": 4})}
    assert results["task_a"].metrics == {"acc": 0.5, "acc_stderr": 0.1}
    assert results["task_a"].n == 4 and results["task_a"].settings["num_fewshot"] == 5
    assert results["task_a"].settings["limit"] == 4 and results["task_a"].settings["n_original"] == 10
    assert results["task_b"].metrics == {"exact_match_strict-match": 0.25}
    assert results["group"].n == 12 and results["group"].settings["subtasks"] == ["task_a", "task_b"]


def test_local_task_on_the_tiny_model_matches_brute_force(tiny_model, byte_tokenizer, tmp_path):
    pytest.importorskip(
        "lm_eval", reason="the lm-eval extra is not installed (pip install 'retainfirst[lm-eval]')"
    )
    write_task(tmp_path)
    tiny_model.train()
    padding_side = byte_tokenizer.padding_side
    results = run_lm_eval(
        tiny_model,
        byte_tokenizer,
        tasks=["rf_tiny_choice"],
        task_dir=tmp_path,
        include_default_tasks=False,
        batch_size=2,
        bootstrap_iters=10,
    )
    assert [r.task for r in results] == ["rf_tiny_choice"]
    result = results[0]
    assert result.n == len(DOCS)
    assert result.metrics["acc"] == pytest.approx(brute_force_accuracy(tiny_model, byte_tokenizer))
    assert "acc_stderr" in result.metrics
    assert result.settings["num_fewshot"] == 0 and result.settings["harness"] == "lm-eval"
    assert tiny_model.training and byte_tokenizer.padding_side == padding_side

    with pytest.raises(RetainFirstError, match="unknown lm-eval task"):
        run_lm_eval(
            tiny_model, byte_tokenizer, tasks=["no_such_task"], task_dir=tmp_path, include_default_tasks=False
        )


def test_instance_without_tokenizer_raises(tiny_model, tmp_path):
    pytest.importorskip(
        "lm_eval", reason="the lm-eval extra is not installed (pip install 'retainfirst[lm-eval]')"
    )
    with pytest.raises(RetainFirstError, match="tokenizer"):
        run_lm_eval(
            tiny_model, None, tasks=["rf_tiny_choice"], task_dir=tmp_path, include_default_tasks=False
        )
    with pytest.raises(RetainFirstError, match="does not exist"):
        run_lm_eval(
            tiny_model, object(), tasks=["x"], task_dir=tmp_path / "missing", include_default_tasks=False
        )


# ----------------------------------------------------------------------------------------------
# Local task files that would run Python (issue 14)


def _evil_task(folder, marker, name="evil.yaml"):
    (folder / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef f(docs): return docs\n")
    (folder / name).write_text("task: evil\nprocess_docs: !function utils.f\n")
    return folder / name


def _reached_harness(monkeypatch):
    import retainfirst.evals.lm_eval_bridge as bridge

    def stop():
        raise RetainFirstError("reached the harness")

    monkeypatch.setattr(bridge, "import_lm_eval", stop)


def test_a_local_task_with_function_is_refused_unless_allowed(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    task = _evil_task(tmp_path, marker)
    _reached_harness(monkeypatch)
    with pytest.raises(RetainFirstError, match=r"evil.yaml uses !function utils.f.*lm_eval_allow_code: true"):
        run_lm_eval(object(), tokenizer=object(), tasks=[str(task)])
    with pytest.raises(RetainFirstError, match="uses !function"):  # any YAML of a task_dir counts
        run_lm_eval(object(), tokenizer=object(), tasks=["rf_tiny_choice"], task_dir=tmp_path)
    with pytest.raises(RetainFirstError, match="reached the harness"):
        run_lm_eval(object(), tokenizer=object(), tasks=[str(task)], allow_code=True)
    assert not marker.exists()


def test_code_in_an_included_file_is_found(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    _evil_task(sub, tmp_path / "ran", name="base.yaml")
    (tmp_path / "top.yaml").write_text("include: sub/base.yaml\ntask: top\n")
    (tmp_path / "python_tag.yaml").write_text("task: t\nx: !!python/name:os.system\n")
    _reached_harness(monkeypatch)
    with pytest.raises(RetainFirstError, match=r"base.yaml uses !function"):
        run_lm_eval(object(), tokenizer=object(), tasks=[str(tmp_path / "top.yaml")])
    with pytest.raises(RetainFirstError, match=r"python_tag.yaml uses tag:yaml.org,2002:python/name"):
        run_lm_eval(object(), tokenizer=object(), tasks=[str(tmp_path / "python_tag.yaml")])


def test_plain_local_tasks_and_registry_tasks_pass_the_check(tmp_path, monkeypatch):
    write_task(tmp_path)
    _reached_harness(monkeypatch)
    with pytest.raises(RetainFirstError, match="reached the harness"):
        run_lm_eval(object(), tokenizer=object(), tasks=["rf_tiny_choice", "mmlu"], task_dir=tmp_path)
