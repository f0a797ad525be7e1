"""The step callback of ``unlearn``: when it runs, what it logs, how it stops, resume after a stop."""

from __future__ import annotations

import random

import pytest
import torch

from retainfirst.engine import TrainConfig, read_metrics, unlearn
from retainfirst.errors import RetainFirstError


def config(**overrides) -> TrainConfig:
    base = {
        "steps": 5,
        "lr": 1e-3,
        "forget_batch_size": 2,
        "retain_batch_size": 2,
        "synthesizer": "pcgrad",
        "forget_loss": "ga",
        "disable_progress": True,
        "save_final_model": False,
        "checkpoint_every": 0,
    }
    return TrainConfig(**{**base, **overrides})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recorder:
    """A callback that records its calls, consumes RNG and switches to eval mode (as an evaluation would)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.stop_at = stop_at

    def __call__(self, step, model):
        self.calls.append((step, model.training))
        model.eval()
        torch.rand(3), random.random()  # must not shift the training RNG streams
        numbers = {"forget": 1.0 / step, "probes": 4}
        if self.stop_at is not None and step >= self.stop_at:
            numbers["stop"] = True
        return numbers


def test_callback_runs_every_n_steps_and_at_the_end_and_changes_nothing(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    plain = unlearn(model, tokenizer, forget, retain, config(), tmp_path / "plain")
    recorder = Recorder()
    model, tokenizer, forget, retain = worker.tiny_setup()
    result = unlearn(
        model, tokenizer, forget, retain, config(), tmp_path / "cb", callback=recorder, eval_every=2
    )
    assert recorder.calls == [(2, True), (4, True), (5, True)]
    assert result.steps_done == 5 and not result.stopped_early
    assert result.model.training  # the loop's mode is restored after the callback
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r.get("eval/forget") for r in records] == [None, 0.5, None, 0.25, 0.2]
    assert records[1]["eval/probes"] == 4 and not any("stopped" in r for r in records)
    before, after = weights(plain.model), weights(result.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # evaluation leaves training untouched


def test_eval_every_zero_calls_only_after_the_last_step_and_eval_steps_are_always_logged(worker, tmp_path):
    recorder = Recorder()
    model, tokenizer, forget, retain = worker.tiny_setup()
    unlearn(model, tokenizer, forget, retain, config(steps=3, log_every=10), tmp_path, callback=recorder)
    assert [step for step, _ in recorder.calls] == [3]
    recorder = Recorder()
    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = config(steps=5, log_every=4)
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path / "b", callback=recorder, eval_every=3)
    assert [r["step"] for r in read_metrics(result.metrics_path)] == [3, 4, 5]


def test_stop_ends_training_saves_and_resume_trains_no_further(worker, tmp_path):
    recorder = Recorder(stop_at=2)
    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = config(steps=6, checkpoint_every=5)
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path, callback=recorder, eval_every=1)
    assert recorder.calls == [(1, True), (2, True)]
    assert result.steps_done == 2 and result.stopped_early
    assert result.final_checkpoint is not None and result.final_checkpoint.name == "step-2"
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [1, 2] and records[-1]["stopped"] is True
    stopped = weights(result.model)

    again = Recorder()
    model, tokenizer, forget, retain = worker.tiny_setup()
    resumed = unlearn(model, tokenizer, forget, retain, cfg, tmp_path, resume=True, callback=again)
    assert resumed.steps_done == 2 and resumed.stopped_early and again.calls == []
    assert [r["step"] for r in read_metrics(resumed.metrics_path)] == [1, 2]
    assert all(torch.equal(stopped[k], v) for k, v in weights(resumed.model).items())


def test_stopped_run_equals_a_run_of_that_many_steps_up_to_the_schedule(worker, tmp_path):
    """Stopping after step 2 of 6 gives the weights of the first 2 steps of the 6-step run."""
    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = config(steps=6, checkpoint_every=2, lr_schedule="constant")
    full = unlearn(model, tokenizer, forget, retain, cfg, tmp_path / "full", callback=lambda s, m: None)
    model, tokenizer, forget, retain = worker.tiny_setup()
    stopped = unlearn(
        model, tokenizer, forget, retain, cfg, tmp_path / "stop", callback=Recorder(stop_at=2), eval_every=2
    )
    from safetensors.torch import load_file

    at_two = load_file(str(tmp_path / "full" / "checkpoints" / "step-2" / "model.safetensors"))
    mine = weights(stopped.model)
    assert all(torch.equal(at_two[k], mine[k]) for k in at_two)
    assert full.steps_done == 6


def test_negative_eval_every_is_refused(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    with pytest.raises(RetainFirstError, match="eval_every=-1 must be >= 0"):
        unlearn(model, tokenizer, forget, retain, config(), tmp_path, callback=Recorder(), eval_every=-1)
