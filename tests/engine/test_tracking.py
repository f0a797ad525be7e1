"""Experiment trackers (read back offline) and the per-step cos(delta theta, g_r / g_f) metrics."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from retainfirst.engine import TrainConfig, read_metrics, unlearn
from retainfirst.engine.loop import Unlearner
from retainfirst.engine.step_cosines import StepCosines
from retainfirst.engine.tracking import flat_config, log_final_table, tracker_problem
from retainfirst.errors import RetainFirstError

HAS_WANDB = importlib.util.find_spec("wandb") is not None
pytest.importorskip("tensorboard")


def config(**overrides) -> TrainConfig:
    base = {
        "steps": 3,
        "lr": 1e-3,
        "forget_batch_size": 2,
        "retain_batch_size": 2,
        "synthesizer": "sum",
        "forget_loss": "ga",
        "retain_loss": "nll",
        "disable_progress": True,
    }
    return TrainConfig(**{**base, **overrides})


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_texts(directory: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
    }


def wandb_history(tracker_dir: Path) -> tuple[list[dict], object]:
    """History rows and the run record of the offline W&B run under ``tracker_dir`` (the .wandb log)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = tracker_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, run, pos, block, buffer = [], None, 7, 32768, b""
    while pos + 7 <= len(data):  # leveldb log format: 32 KiB blocks of (crc, length, type, data)
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buffer += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buffer)
            buffer = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
            elif record.WhichOneof("record_type") == "run":
                run = record.run
    return rows, run


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(key, value)


def test_trackers_receive_the_numbers_of_metrics_jsonl(worker, tmp_path, offline_wandb):
    trackers = ["tensorboard", "wandb"] if HAS_WANDB else ["tensorboard"]
    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = config(report_to=trackers, run_name="sum-a1", tracker_dir=str(tmp_path / "tb"))
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path / "run")
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3]

    logged = tensorboard_scalars(tmp_path / "tb" / "retainfirst")
    numeric = {k for r in records for k, v in r.items() if k != "step" and isinstance(v, int | float)}
    assert {"forget_loss", "cos_update_retain", "cos_step_retain", "cos_step_forget"} <= numeric
    assert set(logged) == numeric
    for key in numeric:  # TensorBoard stores float32
        assert logged[key] == [(r["step"], float(np.float32(r[key]))) for r in records], key

    if HAS_WANDB:
        rows, run = wandb_history(tmp_path / "tb")
        assert run.project == "retainfirst" and run.display_name == "sum-a1"
        assert [row["_step"] for row in rows] == [1, 2, 3]
        for row, record in zip(rows, records, strict=True):  # float64: exactly the same numbers
            assert {k: row[k] for k in numeric} == {k: record[k] for k in numeric}


def test_in_run_numbers_go_to_the_trackers_at_their_step(worker, tmp_path, monkeypatch):
    """What an in-run evaluation callback logs through Unlearner.track lands at the current step."""
    original = Unlearner.optimizer_step

    def step_and_evaluate(self):
        record = original(self)
        self.track({"eval/facts/recall": 0.5 / self.step, "eval/note": "text is dropped"})
        return record

    monkeypatch.setattr(Unlearner, "optimizer_step", step_and_evaluate)
    model, tokenizer, forget, retain = worker.tiny_setup()
    unlearn(model, tokenizer, forget, retain, config(steps=2, report_to=["tensorboard"]), tmp_path)
    logged = tensorboard_scalars(tmp_path / "retainfirst")
    assert logged["eval/facts/recall"] == [(1, 0.5), (2, 0.25)]
    assert "eval/note" not in logged


def test_final_table_is_logged_as_text_and_scalars(tmp_path, offline_wandb):
    rows = [
        {"run": "sum", "forget_score": 0.25, "utility": 97.5, "synthesizer": "sum"},
        {"run": "sago", "forget_score": 0.125, "utility": math.nan, "synthesizer": "sago"},
    ]
    log_final_table(["tensorboard", "wandb"] if HAS_WANDB else ["tensorboard"], tmp_path, rows)
    if HAS_WANDB:  # a real W&B table too (missing and NaN cells: null)
        (table,) = tmp_path.glob("wandb/offline-run-*/files/media/table/final_table_table_*.table.json")
        data = json.loads(table.read_text())
        assert data["columns"] == ["run", "forget_score", "utility", "synthesizer"]
        assert data["data"] == [["sum", 0.25, 97.5, "sum"], ["sago", 0.125, None, "sago"]]
    logged = tensorboard_scalars(tmp_path / "retainfirst")
    assert logged == {
        "final/sum/forget_score": [(0, 0.25)],
        "final/sum/utility": [(0, 97.5)],
        "final/sago/forget_score": [(0, 0.125)],
    }
    (text,) = tensorboard_texts(tmp_path / "retainfirst").values()
    assert text.splitlines()[0] == "| run | forget_score | utility | synthesizer |"
    assert text.splitlines()[2:] == ["| sum | 0.25 | 97.5 | sum |", "| sago | 0.125 | nan | sago |"]


def test_unknown_or_missing_trackers_fail_in_one_line(monkeypatch):
    with pytest.raises(RetainFirstError, match=r"unknown tracker 'tensorbord'; choose from .*tensorboard"):
        config(report_to=["tensorbord"])
    with pytest.raises(RetainFirstError, match="twice"):
        config(report_to="tensorboard,tensorboard")
    assert config(report_to="tensorboard").report_to == ["tensorboard"]  # a CLI override's comma list
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    assert tracker_problem("mlflow") == "has 'mlflow', which is not installed; pip install mlflow"
    with pytest.raises(RetainFirstError) as info:
        config(report_to=["comet_ml"])
    assert "\n" not in str(info.value) and str(info.value).endswith("pip install comet-ml")


def test_an_accelerator_without_the_trackers_is_refused(worker, tmp_path):
    from accelerate import Accelerator

    model, tokenizer, forget, retain = worker.tiny_setup()
    with pytest.raises(RetainFirstError, match=r"does not log to \['tensorboard'\]"):
        unlearn(
            model,
            tokenizer,
            forget,
            retain,
            config(report_to=["tensorboard"]),
            tmp_path,
            accelerator=Accelerator(),
        )


def test_tracker_settings_may_change_on_resume(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    unlearn(model, tokenizer, forget, retain, config(steps=2, checkpoint_every=1), tmp_path)
    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = config(steps=3, checkpoint_every=1, report_to=["tensorboard"], log_step_cosines=False)
    with pytest.raises(RetainFirstError, match=r"\['steps'\]"):  # only the field that changes numbers
        unlearn(model, tokenizer, forget, retain, cfg, tmp_path, resume=True)


def test_flat_config_gives_trackers_scalars_only():
    flat = flat_config(config(report_to=["tensorboard"], forget_loss="simnpo").to_dict())
    assert flat["forget_kwargs/beta"] == 0.25 and flat["forget_kwargs/delta"] == 0.0
    assert flat["betas"] == "[0.9, 0.999]" and flat["report_to"] == '["tensorboard"]'
    assert flat["trainable_patterns"] == "null" and flat["steps"] == 3
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())


# ---- cos(delta theta, g) ------------------------------------------------------------------------


class CloningSynthesizer:
    """Wraps the run's synthesizer and keeps float64 clones of the gradients it is given."""

    def __init__(self, inner):
        self.inner, self.inputs = inner, []

    def combine(self, forget_grads, retain_grads, all_reduce_fn=None):
        clone = lambda grads: [None if g is None else g.detach().double().clone() for g in grads]  # noqa: E731
        self.inputs.append((clone(forget_grads), clone(retain_grads)))
        return self.inner.combine(forget_grads, retain_grads, all_reduce_fn=all_reduce_fn)


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a_flat, b_flat = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float(a_flat @ b_flat / (a_flat.norm() * b_flat.norm()))


@pytest.mark.parametrize("synthesizer", ["sum", "sago"])
def test_step_cosines_are_those_of_the_actual_weight_change(worker, tmp_path, synthesizer):
    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = config(synthesizer=synthesizer, alpha=0.3, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5)
    unlearner = Unlearner(model, tokenizer, forget, retain, cfg, tmp_path)
    unlearner.synthesizer = recorder = CloningSynthesizer(unlearner.synthesizer)
    for _ in range(3):
        before = [p.detach().double().clone() for p in unlearner.params]
        record = unlearner.optimizer_step()
        delta = [p.detach().double() - w for p, w in zip(unlearner.params, before, strict=True)]
        forget_grads, retain_grads = recorder.inputs[-1]
        assert record["cos_step_retain"] == pytest.approx(cosine(delta, retain_grads), abs=1e-5)
        assert record["cos_step_forget"] == pytest.approx(cosine(delta, forget_grads), abs=1e-5)
        norm = float(torch.cat([d.reshape(-1) for d in delta]).norm())
        assert record["norm_step"] == pytest.approx(norm, rel=1e-5)
        # Adam changes the direction: the step is not the update (else the two cosines would agree)
        assert abs(record["cos_step_retain"] - record["cos_update_retain"]) > 1e-3


def test_measuring_step_cosines_changes_no_number(worker, tmp_path):
    runs = {}
    for flag in (True, False):
        model, tokenizer, forget, retain = worker.tiny_setup()
        runs[flag] = unlearn(
            model, tokenizer, forget, retain, config(log_step_cosines=flag), tmp_path / str(flag)
        )
    on, off = read_metrics(runs[True].metrics_path), read_metrics(runs[False].metrics_path)
    assert all("cos_step_retain" in r for r in on) and not any("cos_step_retain" in r for r in off)
    weights_off = dict(runs[False].model.named_parameters())
    assert all(torch.equal(p, weights_off[n]) for n, p in runs[True].model.named_parameters())
    assert [r["cos_update_retain"] for r in on] == [r["cos_update_retain"] for r in off]


def test_step_cosines_memory_is_a_weight_copy_and_a_retain_copy():
    """Measured on a 3 x 1000 bf16 parameter set: gradient space holds 2 extra copies, update space 1."""
    params = [torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16)) for _ in range(3)]
    forget = [torch.ones(1000, dtype=torch.bfloat16) for _ in range(3)]
    retain = [torch.ones(1000, dtype=torch.bfloat16), None, torch.ones(1000, dtype=torch.bfloat16)]
    gradient_space = StepCosines(forget, retain, consumed=True)
    gradient_space.snapshot(params)
    # weights (3 x 2000 B) + g_r copies (2 x 2000 B) + g_f where g_r is None (1 x 2000 B)
    assert gradient_space.extra_bytes() == 6 * 2000
    assert gradient_space.retain[0] is not retain[0] and gradient_space.forget[0] is forget[0]
    update_space = StepCosines(forget, retain, consumed=False)
    update_space.snapshot(params)
    assert update_space.extra_bytes() == 3 * 2000
    for p in params:
        p.data.add_(1.0)
    stats = update_space.finish(params)
    assert stats["norm_step"] == pytest.approx(math.sqrt(3000))
    assert stats["cos_step_forget"] == pytest.approx(1.0) and stats["cos_step_retain"] == pytest.approx(
        math.sqrt(2 / 3)
    )
    assert update_space.before is None  # the copies are freed
