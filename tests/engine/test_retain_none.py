"""``retain_loss: none`` (the forget-only baselines GradAscent / NPOForget / SimNPOForget): no retain pass
at all, and the update is gamma * g_f whatever the synthesizer."""

from __future__ import annotations

import pytest
import torch

from retainfirst.engine import TrainConfig, read_metrics, unlearn


def config(**overrides) -> TrainConfig:
    base = {
        "steps": 3,
        "lr": 1e-3,
        "forget_batch_size": 2,
        "retain_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "lr_schedule": "linear",
        "warmup_ratio": 0.34,
        "gamma": 0.7,
        "forget_loss": "ga",
        "disable_progress": True,
    }
    return TrainConfig(**{**base, **overrides})


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(("retain_loss", "forwards"), [("none", 3 * 2), ("nll", 3 * 2 * 2)])
def test_no_retain_forward_runs(worker, tmp_path, retain_loss, forwards):
    model, tokenizer, forget, retain = worker.tiny_setup()
    calls = count_forwards(model)
    result = unlearn(model, tokenizer, forget, retain, config(retain_loss=retain_loss), tmp_path)
    assert calls[0] == forwards  # steps x accumulation x (forget [+ retain]) passes
    records = read_metrics(result.metrics_path)
    if retain_loss == "none":
        for record in records:  # what needs g_r does not exist: null on disk
            assert record["retain_loss"] is None and record["norm_retain"] is None
            assert record["cos_forget_retain"] is None and record["conflict_fraction"] is None
            assert record["forget_loss"] < 0 and record["norm_forget"] > 0 and record["norm_update"] > 0
            assert record["norm_update"] == pytest.approx(0.7 * record["norm_forget"], rel=1e-6)


@pytest.mark.parametrize("synthesizer", ["sum", "pcgrad", "sago"])
def test_forget_only_equals_sum_with_alpha_zero(worker, tmp_path, synthesizer):
    model, tokenizer, forget, retain = worker.tiny_setup()
    alone = unlearn(
        model,
        tokenizer,
        forget,
        retain,
        config(retain_loss="none", synthesizer=synthesizer, alpha=0.5),
        tmp_path / "alone",
    )
    model, tokenizer, forget, retain = worker.tiny_setup()
    summed = unlearn(model, tokenizer, forget, retain, config(synthesizer="sum", alpha=0.0), tmp_path / "sum")
    a, b = dict(alone.model.named_parameters()), dict(summed.model.named_parameters())
    assert a.keys() == b.keys()
    fresh = worker.tiny_setup()[0]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], fresh.get_parameter(name)) for name in a)  # the runs did train
