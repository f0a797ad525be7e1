"""The two-pass loop on the tiny Llama: learning signal, metrics, synthesis, accumulation, guards."""

from __future__ import annotations

import copy
import json
import math
import shutil
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

import retainfirst.objectives as objectives
import retainfirst.synthesis as synthesis
from retainfirst.data import collate
from retainfirst.engine import TrainConfig, read_metrics, unlearn
from retainfirst.engine.batches import ExampleStream
from retainfirst.errors import NonFiniteError, RetainFirstError
from retainfirst.objectives.base import token_nll
from retainfirst.synthesis import register_synthesizer
from retainfirst.synthesis.strategies import SumSynthesizer

REQUIRED_KEYS = {
    "step",
    "forget_loss",
    "retain_loss",
    "lr",
    "norm_forget",
    "norm_retain",
    "norm_update",
    "norm_update_post_clip",
    "conflict_fraction",
    "cos_forget_retain",
    "cos_update_retain",
    "seconds_per_step",
    "synthesis_seconds",
}


def config(**overrides) -> TrainConfig:
    base = {
        "steps": 4,
        "lr": 1e-3,
        "forget_batch_size": 2,
        "retain_batch_size": 2,
        "synthesizer": "sago",
        "forget_loss": "ga",
        "retain_loss": "nll",
        "disable_progress": True,
        "save_final_model": False,
    }
    return TrainConfig(**{**base, **overrides})


def mean_nll(model, examples) -> float:
    model.eval()
    with torch.no_grad():
        values = []
        for example in examples:
            ids = example["input_ids"][None]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            values.append(float(token_nll(logits, ids, torch.ones_like(ids))))
    return sum(values) / len(values)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class Recorder:
    """Wraps a real synthesizer and keeps clones of its inputs and outputs."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def combine(self, forget_grads, retain_grads, all_reduce_fn=None):
        clone = lambda grads: [None if g is None else g.detach().clone() for g in grads]  # noqa: E731
        inputs = (clone(forget_grads), clone(retain_grads))
        update, stats = self.inner.combine(forget_grads, retain_grads, all_reduce_fn)
        self.calls.append((*inputs, clone(update), stats))
        return update, stats


@pytest.fixture
def record_synthesis(monkeypatch):
    recorders = []
    real = synthesis.get_synthesizer

    def fake(name, alpha=1.0, gamma=1.0, **options):
        recorders.append(Recorder(real(name, alpha, gamma, **options)))
        return recorders[-1]

    monkeypatch.setattr(synthesis, "get_synthesizer", fake)
    return recorders


def test_ga_raises_forget_nll_and_keeps_retain(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    forget_before, retain_before = mean_nll(model, forget), mean_nll(model, retain)
    result = unlearn(model, tokenizer, forget, retain, config(steps=8, lr=3e-3), tmp_path)
    forget_after, retain_after = mean_nll(result.model, forget), mean_nll(result.model, retain)
    assert forget_after > forget_before + 0.5
    assert retain_after < retain_before + 0.05
    assert result.steps_done == 8


def test_metrics_have_every_stat_each_step(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = config(steps=3, synthesizer="pcgrad", lr_schedule="linear", warmup_steps=1)
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path)
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert REQUIRED_KEYS | {"projected_fraction"} <= set(record)
        assert all(v is None or math.isfinite(v) for v in record.values() if isinstance(v, float))
        assert record["norm_update_post_clip"] <= cfg.max_grad_norm + 1e-4
        assert record["forget_loss"] < 0  # ga minimises -NLL
    assert [r["lr"] for r in records] == pytest.approx([0.0, 1e-3, 5e-4])  # warmup then linear decay
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert TrainConfig.from_dict(saved) == cfg


def test_sago_update_never_opposes_retain_gradient(worker, tmp_path, record_synthesis):
    model, tokenizer, forget, retain = worker.tiny_setup()
    before = weights(model)
    names = [name for name, _ in model.named_parameters()]
    cfg = config(steps=1, max_grad_norm=None, synthesizer="sago", alpha=1.0, gamma=1.0)
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path)
    forget_grads, retain_grads, update, stats = record_synthesis[0].calls[0]
    assert 0 < stats["conflict_fraction"] < 1
    after = weights(result.model)
    for name, g_f, g_r, u in zip(names, forget_grads, retain_grads, update, strict=True):
        assert (u * g_r >= 0).all(), name
        assert torch.equal(u, torch.where(g_f * g_r < 0, g_r, g_f))
        # AdamW's first step moves each weight by -lr*sign(u) (plus decay): it follows the update
        step = after[name] - before[name]
        assert (step * u <= 0).all(), name
        moved = u.abs() > 1e-6
        assert (step[moved].abs() > 0.5e-3).all(), name


def test_sum_synthesizer_applies_gamma_f_plus_alpha_r(worker, tmp_path, record_synthesis):
    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = config(steps=2, synthesizer="sum", alpha=0.5, gamma=2.0)
    unlearn(model, tokenizer, forget, retain, cfg, tmp_path)
    for forget_grads, retain_grads, update, _ in record_synthesis[0].calls:
        for g_f, g_r, u in zip(forget_grads, retain_grads, update, strict=True):
            torch.testing.assert_close(u, 2.0 * g_f + 0.5 * g_r)


@register_synthesizer("test_recording_sum")
class RecordingSum(SumSynthesizer):
    """The plain weighted sum, keeping clones of the (g_f, g_r) the loop hands it at every step."""

    calls: ClassVar[list[tuple[list, list]]] = []

    def combine(self, forget_grads, retain_grads, all_reduce_fn=None):
        clone = lambda grads: [None if g is None else g.detach().clone() for g in grads]  # noqa: E731
        RecordingSum.calls.append((clone(forget_grads), clone(retain_grads)))
        return super().combine(forget_grads, retain_grads, all_reduce_fn)


@pytest.fixture
def recorded():
    RecordingSum.calls.clear()
    yield RecordingSum.calls
    RecordingSum.calls.clear()


def float64_setup(worker):
    model, tokenizer, forget, retain = worker.tiny_setup()
    return model.double(), tokenizer, forget, retain


def autograd_gradients(model, tokenizer, forget, retain, cfg, streams, reference):
    """g_f and g_r of one optimizer step computed independently: autograd of the mean micro-batch losses."""
    forget_objective = objectives.get_forget_objective(cfg.forget_loss, **cfg.forget_kwargs)
    retain_objective = objectives.get_retain_objective(cfg.retain_loss, **cfg.retain_kwargs)
    params = [p for _, p in model.named_parameters()]
    forget_total = retain_total = 0.0
    for _ in range(cfg.gradient_accumulation_steps):
        forget_batch = collate(
            [forget[i] for i in streams[0].take(cfg.forget_batch_size)], tokenizer.pad_token_id
        )
        retain_batch = collate(
            [retain[i] for i in streams[1].take(cfg.retain_batch_size)], tokenizer.pad_token_id
        )
        forget_total = forget_total + forget_objective.loss(model, forget_batch, reference)
        retain_total = retain_total + retain_objective.loss(model, retain_batch, reference)
    steps = cfg.gradient_accumulation_steps
    g_f = torch.autograd.grad(forget_total / steps, params, allow_unused=True)
    g_r = torch.autograd.grad(retain_total / steps, params, allow_unused=True)
    return g_f, g_r


@pytest.mark.parametrize("forget_loss", ["ga", "npo"])
def test_loop_hands_the_synthesizer_the_exact_forget_and_retain_gradients(
    worker, tmp_path, recorded, forget_loss
):
    """float64 tiny Llama: the loop's g_f and g_r equal separately computed autograd gradients."""
    model, tokenizer, forget, retain = float64_setup(worker)
    initial = copy.deepcopy(model)
    cfg = config(
        steps=2,
        synthesizer="test_recording_sum",
        alpha=0.3,
        gamma=1.7,
        forget_loss=forget_loss,
        gradient_accumulation_steps=2,
        forget_batch_size=3,
        retain_batch_size=2,
        checkpoint_every=1,
    )
    unlearn(model, tokenizer, forget, retain, cfg, tmp_path)
    assert len(recorded) == 2

    reference = objectives.make_reference(copy.deepcopy(initial)) if forget_loss == "npo" else None
    streams = (ExampleStream(len(forget), cfg.seed, "forget"), ExampleStream(len(retain), cfg.seed, "retain"))
    check = copy.deepcopy(initial).train()
    for step, (forget_grads, retain_grads) in enumerate(recorded):
        if step == 1:  # the weights after the first update, as checkpointed by the loop
            check.load_state_dict(
                load_file(str(tmp_path / "checkpoints" / "step-1" / "model.safetensors")), strict=False
            )
        expected_f, expected_r = autograd_gradients(check, tokenizer, forget, retain, cfg, streams, reference)
        for got, want in ((forget_grads, expected_f), (retain_grads, expected_r)):
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == torch.float64
                torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
        assert any(not torch.allclose(f, r) for f, r in zip(forget_grads, retain_grads, strict=True))


def test_accumulation_2x2_equals_one_batch_of_4(worker, tmp_path, recorded):
    """float64, so summation-order differences (~1e-16) stay far below the tolerances, even after Adam."""
    runs = []
    for batch, accumulation in ((4, 1), (2, 2)):
        recorded.clear()
        model, tokenizer, forget, retain = float64_setup(worker)
        cfg = config(
            steps=3,
            synthesizer="test_recording_sum",
            alpha=0.5,
            gamma=2.0,
            forget_batch_size=batch,
            retain_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path / f"b{batch}")
        runs.append((weights(result.model), read_metrics(result.metrics_path), list(recorded)))
    (w_one, m_one, g_one), (w_acc, m_acc, g_acc) = runs
    assert len(g_one) == len(g_acc) == 3
    for (f_one, r_one), (f_acc, r_acc) in zip(g_one, g_acc, strict=True):
        for a, b in zip(f_one + r_one, f_acc + r_acc, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    for name in w_one:
        torch.testing.assert_close(w_acc[name], w_one[name], rtol=0, atol=1e-10)
    for a, b in zip(m_one, m_acc, strict=True):
        assert a["forget_loss"] == pytest.approx(b["forget_loss"], rel=1e-6)  # logged as float32
        assert a["norm_retain"] == pytest.approx(b["norm_retain"], rel=1e-6)  # stats are float32 sums


class SpyRetain:
    """Retain objective wrapper that records whether any trainable gradient exists at its forward."""

    def __init__(self, inner, model_params):
        self.inner = inner
        self.params = model_params
        self.seen = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, model, batch, reference=None):
        self.seen.append([p.grad for p in self.params() if p.requires_grad])
        return self.inner.loss(model, batch, reference)


def test_forget_grads_are_out_of_param_grad_before_retain_forward(worker, tmp_path, monkeypatch):
    model, tokenizer, forget, retain = worker.tiny_setup()
    spies = []
    real = objectives.get_retain_objective
    monkeypatch.setattr(
        objectives,
        "get_retain_objective",
        lambda name, **kw: spies.append(SpyRetain(real(name, **kw), model.parameters)) or spies[-1],
    )
    unlearn(model, tokenizer, forget, retain, config(steps=2, gradient_accumulation_steps=2), tmp_path)
    seen = spies[0].seen
    assert len(seen) == 4
    # first micro-batch of each step: nothing; second: only the first micro-batch's retain gradients
    assert all(g is None for g in seen[0]) and all(g is None for g in seen[2])
    assert all(g is not None for g in seen[1])


def test_trainable_patterns_restrict_what_moves(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    before = weights(model)
    cfg = config(steps=2, trainable_patterns=[r"layers\.1\.mlp\.down_proj"])
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path)
    changed = {k for k, v in weights(result.model).items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}


def test_rmu_default_trainable_set(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    before = weights(model)
    cfg = config(
        steps=2,
        forget_loss="rmu",
        forget_kwargs={"layer": 1},
        retain_loss="embed_diff",
        retain_kwargs={"layer": 1},
    )
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path)
    changed = {k for k, v in weights(result.model).items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}


@pytest.mark.parametrize(
    ("overrides", "data", "message"),
    [
        ({"trainable_patterns": ["no_such_param"]}, None, "trainable pattern 'no_such_param' matches no"),
        ({"synthesizer": "nope"}, None, "synthesizer='nope' is not valid; choose one of"),
        ({"forget_loss": "nope"}, None, "forget_loss='nope' is not valid; choose one of"),
        ({}, "empty_forget", "forget data is empty"),
        ({}, "empty_retain", "retain data is empty"),
        ({"max_length": 16}, None, "has 24 tokens but at most 16"),
        ({}, "too_long", "retain example 0 has 600 tokens but at most 512"),
    ],
)
def test_bad_input_fails_before_any_step(worker, tmp_path, overrides, data, message):
    model, tokenizer, forget, retain = worker.tiny_setup()
    if data == "empty_forget":
        forget = []
    elif data == "empty_retain":
        retain = []
    elif data == "too_long":
        ids = torch.ones(600, dtype=torch.long)
        retain = [{"input_ids": ids, "attention_mask": ids}]
    with pytest.raises(RetainFirstError, match=message):
        unlearn(model, tokenizer, forget, retain, config(**overrides), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


class NaNAfter:
    """Forget objective whose loss (or only its gradient) turns NaN from call ``bad_call`` on."""

    def __init__(self, inner, bad_call, where):
        self.inner, self.bad_call, self.where, self.calls = inner, bad_call, where, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, model, batch, reference=None):
        self.calls += 1
        loss = self.inner.loss(model, batch, reference)
        if self.calls >= self.bad_call:
            if self.where == "loss":
                return loss * float("nan")
            loss.register_hook(lambda g: g * float("nan"))
        return loss


@pytest.mark.parametrize(
    ("where", "message"), [("loss", "the forget loss is nan"), ("grad", "the forget gradient is not finite")]
)
def test_non_finite_stops_and_keeps_last_good_checkpoint(worker, tmp_path, monkeypatch, where, message):
    model, tokenizer, forget, retain = worker.tiny_setup()
    real = objectives.get_forget_objective
    monkeypatch.setattr(
        objectives, "get_forget_objective", lambda name, **kw: NaNAfter(real(name, **kw), 3, where)
    )
    with pytest.raises(NonFiniteError, match=f"step 3: {message}"):
        unlearn(model, tokenizer, forget, retain, config(steps=5, checkpoint_every=1), tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert not (tmp_path / "checkpoints" / "step-3").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_existing_run_needs_resume_flag(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    unlearn(model, tokenizer, forget, retain, config(steps=1), tmp_path)
    with pytest.raises(RetainFirstError, match="pass resume=True"):
        unlearn(model, tokenizer, forget, retain, config(steps=1), tmp_path)
    with pytest.raises(RetainFirstError, match=r"field\(s\) \['lr'\] differ"):
        unlearn(model, tokenizer, forget, retain, config(steps=1, lr=0.5), tmp_path, resume=True)


def test_bf16_mixed_precision_runs(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    result = unlearn(model, tokenizer, forget, retain, config(steps=2, mixed_precision="bf16"), tmp_path)
    records = read_metrics(result.metrics_path)
    assert all(math.isfinite(r["forget_loss"]) and math.isfinite(r["norm_update"]) for r in records)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, fp32 master weights


def test_final_model_is_saved_with_safetensors(worker, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, forget, retain = worker.tiny_setup()
    result = unlearn(model, tokenizer, forget, retain, config(steps=1, save_final_model=True), tmp_path)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for (name, a), b in zip(result.model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert result.final_checkpoint == tmp_path / "checkpoints" / "step-1"


def test_gradient_checkpointing_gives_the_same_weights_on_padded_batches(worker, byte_tokenizer, tmp_path):
    def ragged(prefix):
        out = []
        for i in range(6):
            ids = torch.tensor(byte_tokenizer(f"{prefix} {i} " + "xyz" * (i + 1))["input_ids"])
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return out

    forget, retain = ragged("secret"), ragged("public")
    assert len({len(e["input_ids"]) for e in forget}) > 1
    finals = []
    for checkpointing in (False, True):
        model, tokenizer, _, _ = worker.tiny_setup()
        cfg = config(steps=2, gradient_checkpointing=checkpointing)
        result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path / str(checkpointing))
        assert all(math.isfinite(r["forget_loss"]) for r in read_metrics(result.metrics_path))
        finals.append(weights(result.model))
    for name in finals[0]:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=1e-5, atol=1e-6)


def test_log_every_and_keep_checkpoints(worker, tmp_path):
    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = config(steps=5, log_every=2, checkpoint_every=1, keep_checkpoints=2)
    unlearn(model, tokenizer, forget, retain, cfg, tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2, 4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-4", "step-5"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-5"


def test_half_written_checkpoints_are_cleaned_and_resume_without_checkpoint_starts_fresh(worker, tmp_path):
    partial = tmp_path / "checkpoints" / ".tmp-step-3"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"garbage")
    model, tokenizer, forget, retain = worker.tiny_setup()
    result = unlearn(model, tokenizer, forget, retain, config(steps=2), tmp_path, resume=True)
    assert result.steps_done == 2 and not partial.exists()
    assert [r["step"] for r in read_metrics(result.metrics_path)] == [1, 2]


def test_bf16_weights_train_with_float32_moments_and_resume_exactly(worker, tmp_path):
    """bf16 *weights* (no autocast): finite losses, float32 Adam moments, bit-identical resume."""

    def bf16_setup():
        model, tokenizer, forget, retain = worker.tiny_setup()
        return model.to(torch.bfloat16), tokenizer, forget, retain

    cfg = config(steps=4, checkpoint_every=2, lr=1e-2, weight_decay=0.01)
    model, tokenizer, forget, retain = bf16_setup()
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path / "full")
    records = read_metrics(result.metrics_path)
    assert len(records) == 4 and all(math.isfinite(r["forget_loss"]) for r in records)
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters())
    step = tmp_path / "full" / "checkpoints" / "step-2"
    moments = load_file(str(step / "training_state.safetensors"))
    exp_avg_sq = [v for k, v in moments.items() if k.endswith(".exp_avg_sq")]
    assert exp_avg_sq and all(v.dtype == torch.float32 for v in exp_avg_sq)
    assert load_file(str(step / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-4")
    (resumed_dir / "checkpoints" / "latest").write_text("step-2\n")
    model, tokenizer, forget, retain = bf16_setup()
    resumed = unlearn(model, tokenizer, forget, retain, cfg, resumed_dir, resume=True)
    assert resumed.steps_done == 4
    full, again = weights(result.model), weights(resumed.model)
    assert all(torch.equal(full[k], again[k]) for k in full)
    timing = {"seconds_per_step", "synthesis_seconds"}
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert untimed(read_metrics(resumed.metrics_path)) == untimed(records)
