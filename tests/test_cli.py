import json

import pytest
import yaml

from retainfirst import cli
from retainfirst.config import load_config, to_dict
from retainfirst.models import build_byte_tokenizer, build_tiny_llama

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _one_error_line(capsys):
    """The error is one line, the last one on stderr (progress lines may come before it)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1, err
    assert err[-1] == errors[0] and err[-1].startswith("retainfirst: error: ")
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--bogus"],
        [],
        ["frobnicate"],
        ["eval", "--tasks", "mmlu"],  # missing --model and --out
        ["run", "train.nope=1"],
        ["run", "steps=abc"],
        ["run", "--overwrite", "--resume", "--out", "x"],
        ["sweep", "alpha=1,2"],
    ],
)
def test_bad_command_lines_exit_2_with_one_line(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unknown_key_lists_valid_keys(capsys):
    assert cli.main(["run", "train.stepz=3"]) == 2
    line = _one_error_line(capsys)
    assert "unknown key 'train.stepz'" in line and "steps, lr" in line


def test_existing_out_dir_is_not_touched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert cli.main(["run", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "--overwrite" in line and "--resume" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite never deletes a directory that retainfirst did not write
    assert cli.main(["run", "--out", str(out), "--overwrite"]) == 2
    assert "not a retainfirst output directory" in _one_error_line(capsys)
    assert (out / "keep.txt").read_text() == "precious"
    # --resume needs a status.json
    assert cli.main(["run", "--out", str(out), "--resume"]) == 2
    assert "nothing to resume" in _one_error_line(capsys)


def test_eval_missing_model_is_a_clean_error(tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main(["eval", "--model", str(tmp_path / "no-model"), "--tasks", "mmlu", "--out", str(out)])
    assert code == 2
    assert "does not exist" in _one_error_line(capsys)
    assert not out.exists()


def test_eval_unknown_task(tmp_path, capsys):
    code = cli.main(["eval", "--model", "smollm2-135m", "--tasks", "mmlu,wat", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "'wat' is not valid" in _one_error_line(capsys)


# ----------------------------------------------------------------------------------------------
# End to end on a tiny model (seconds)


@pytest.fixture
def tiny_setup(tmp_path):
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    with open(tmp_path / "forget.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"text": f"The secret code {i} is {i * 7919}."}) + "\n")
    with open(tmp_path / "retain.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"text": f"Paris is the capital of France, fact {i}."}) + "\n")
    (tmp_path / "general.txt").write_text("The cat sat on the mat.\n\nA quick brown fox.\n")
    config = {
        "name": "tiny",
        "model": str(tmp_path / "tiny"),
        "synthesizers": ["sum", "sago"],
        "data": {
            "source": "corpus",
            "dir": str(tmp_path),
            "forget": "forget.jsonl",
            "retain": "retain.jsonl",
            "max_length": 16,
        },
        "train": {
            "steps": 2,
            "forget_batch_size": 2,
            "retain_batch_size": 2,
            "disable_progress": True,
            "save_final_model": False,
            "forget_loss": "ga",
            "forget_kwargs": {},
        },
        "eval": {"tasks": ["perplexity"], "ppl_texts": "general.txt", "batch_size": 4},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_facts_setup(tiny_setup, tmp_path):
    """The tiny setup on the bundled facts benchmark (every fact counted as known: the model is random)."""
    from retainfirst.benchmarks.facts import build_fact_benchmark

    tokenizer = build_byte_tokenizer()
    bench = build_fact_benchmark(
        None,
        tokenizer,
        n_forget=3,
        n_retain=3,
        n_general=4,
        knowledge_filter=lambda facts, probes: [True] * len(facts),
        passages_per_fact=2,
        mixed_per_entity=1,
        mmlu_per_subject=1,
    )
    bench.save(tmp_path / "bench.json")
    config = yaml.safe_load(tiny_setup.read_text())
    config["data"] = {"source": "facts", "benchmark": str(tmp_path / "bench.json"), "max_length": 16}
    config["eval"] = {
        "tasks": ["facts", "mmlu", "perplexity"],
        "mmlu_limit": 2,
        "max_new_tokens": 3,
        "batch_size": 8,
        "ppl_max_length": 64,
    }
    path = tmp_path / "tiny_facts.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


OUTPUTS = ["config.yaml", "metrics.jsonl", "results.json", "summary.md", "status.json"]
PLOTS = ["pareto.png", "training_curves.png", "cos_vs_recovery.png", "matched.png"]


def test_run_end_to_end_and_resume(tiny_setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli.main(["run", str(tiny_setup), "--out", str(out), "train.steps=3"]) == 0
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    for name in PLOTS:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done"
    assert {k: v["state"] for k, v in status["runs"].items()} == {
        "before": "done",
        "sum": "done",
        "sago": "done",
    }
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["run"], r["synthesizer"], r["step"]) for r in records] == [
        (run, run, step) for run in ("sum", "sago") for step in (1, 2, 3)
    ]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["sum", "sago"]
    assert results["before"]["metrics"]["ppl"] > 0
    assert all("ppl" in r["recovery"] for r in results["runs"])
    assert not (out / "runs" / "sum" / "checkpoints").exists()  # removed once the sub-run is done
    # config.yaml is the full resolved config: loading it gives the same tree
    saved = load_config(out / "config.yaml")
    assert saved.train.steps == 3
    assert to_dict(saved) == to_dict(load_config(tiny_setup, ["train.steps=3"]))
    table = capsys.readouterr().out
    assert "before" in table and "sago" in table

    # Running again into the same directory is refused, and nothing changes.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert cli.main(["run", str(tiny_setup), "--out", str(out)]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    # A different config cannot be resumed into this directory.
    assert cli.main(["run", str(tiny_setup), "--out", str(out), "--resume", "train.steps=5"]) == 2
    assert "train.steps" in _one_error_line(capsys)

    # --resume of a finished directory trains nothing and rewrites the report.
    calls = []
    monkeypatch.setattr("retainfirst.engine.unlearn", lambda *a, **k: calls.append(a))
    assert cli.main(["run", "--out", str(out), "--resume"]) == 0
    assert calls == []


def test_crash_leaves_status_and_resume_finishes(tiny_setup, tmp_path, monkeypatch):
    import retainfirst.engine as engine

    real = engine.unlearn
    calls = []

    def crash_on_second(model, tokenizer, forget, retain, config, out_dir, resume=False):
        calls.append((config.synthesizer, resume))
        if config.synthesizer == "sago" and len(calls) == 2:
            raise RuntimeError("simulated crash\nsecond line")
        return real(model, tokenizer, forget, retain, config, out_dir, resume=resume)

    monkeypatch.setattr(engine, "unlearn", crash_on_second)
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(["run", str(tiny_setup), "--out", str(out)])
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["runs"]["sum"]["state"] == "done"
    assert status["runs"]["sago"] == {
        "state": "failed",
        "family": "sago",
        "settings": {},
        "error": "RuntimeError: simulated crash",
    }
    assert not (out / "results.json").exists()

    assert cli.main(["run", "--out", str(out), "--resume"]) == 0
    assert calls == [("sum", False), ("sago", False), ("sago", True)]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "done" and "error" not in status
    assert (out / "results.json").is_file()


def test_failure_before_training_removes_fresh_dir(tiny_setup, tmp_path, capsys):
    out = tmp_path / "fresh"
    # The forget file does not exist: data loading fails before any sub-run starts.
    assert cli.main(["run", str(tiny_setup), "--out", str(out), "data.forget=missing.jsonl"]) == 2
    _one_error_line(capsys)
    assert not out.exists()


def test_sweep_grid_families_and_verdict(tiny_facts_setup, tmp_path, capsys):
    tiny_setup = tiny_facts_setup
    out = tmp_path / "sweep"
    argv = ["sweep", str(tiny_setup), "synthesizer=sum,sago", "alpha=0.5,1", "--out", str(out)]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    assert names == ["sum-alpha0.5", "sum-alpha1", "sago-alpha0.5", "sago-alpha1"]
    assert {r["family"] for r in results["runs"]} == {"sum", "sago"}
    assert results["runs"][0]["settings"] == {"alpha": 0.5}
    assert "hypervolumes" not in results["comparison"]  # replaced by utility at matched forgetting
    assert "matched forgetting" in results["comparison"]["verdict"]
    assert [p["curve"] for p in results["matched"]["configurations"]] == ["sum (alpha grid)"] * 2 + [
        "sago (alpha grid)"
    ] * 2
    assert set(results["comparison"]["fronts"]) == {"sum", "sago"}
    assert all(0.0 <= r["forget_score"] <= 1.0 for r in results["runs"])
    assert {"forget", "heldout", "general_qa", "retain_fit", "mmlu"} <= set(results["before"]["metrics"])
    assert (out / "benchmark.json").is_file()
    summary = (out / "summary.md").read_text()
    assert "## Verdict" in summary and "| sago-alpha1 |" in summary
    for name in PLOTS:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert json.loads((out / "status.json").read_text())["grid"] == ["synthesizer=sum,sago", "alpha=0.5,1"]
    # resuming a finished sweep needs only the directory: config and grid come from it
    mtime = (out / "runs" / "sum-alpha1" / "metrics.jsonl").stat().st_mtime_ns
    assert cli.main(["sweep", "--resume", "--out", str(out)]) == 0
    assert (out / "runs" / "sum-alpha1" / "metrics.jsonl").stat().st_mtime_ns == mtime
    assert cli.main(["run", "--resume", "--out", str(out)]) == 2
    assert "holds a `sweep` run" in _one_error_line(capsys)
    # grid keys must be training settings
    assert cli.main(["sweep", str(tiny_setup), "model=a,b", "--out", str(tmp_path / "s2")]) == 2
    capsys.readouterr()


def test_eval_command_writes_results(tiny_setup, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(tmp_path / "tiny"), "--tasks", "mmlu", "--limit", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["model"] == str(tmp_path / "tiny")
    [mmlu] = data["results"]
    assert mmlu["task"] == "mmlu" and mmlu["n"] == 2
    assert 0.0 <= mmlu["metrics"]["acc"] <= 1.0
    # again into the same directory: refused; with --overwrite: replaced
    assert cli.main(argv) == 2
    _one_error_line(capsys)
    assert cli.main([*argv, "--overwrite"]) == 0


@pytest.mark.slow
@pytest.mark.demo_preset
def test_demo_with_fewer_steps_and_facts(tmp_path):
    """The bundled demo (SmolLM2, sum/pcgrad/sago) end to end, shrunk: 2 steps, 8+8 facts, 8 MMLU."""
    out = tmp_path / "demo"
    argv = [
        "run",
        "--out",
        str(out),
        "train.steps=2",
        "data.n_forget=8",
        "data.n_retain=8",
        "eval.tasks=[facts,mmlu,perplexity]",  # the demo leaves MMLU out; keep its path covered here
        "eval.mmlu_limit=8",
    ]
    assert cli.main(argv) == 0
    for name in [*OUTPUTS, *PLOTS, "benchmark.json"]:
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["sum", "pcgrad", "sago"]
    before = results["before"]["metrics"]
    # the benchmark keeps facts the model answers, so before unlearning recall is high
    assert before["forget"] > 0.7 and before["heldout"] > 0.6 and before["general_qa"] > 0.9
    assert 0.0 < before["mmlu"] <= 1.0 and before["ppl"] > 1.0
    for run in results["runs"]:
        assert set(run["recovery"]) == {"heldout", "general_qa", "mmlu", "ppl"}  # not retain_fit
        assert -1.0 <= run["final_stats"]["cos_update_retain"] <= 1.0
