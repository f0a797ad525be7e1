"""UnlearningTrainer (HF Trainer + two-pass step) against retainfirst's own engine, on a tiny float64 Llama.

float64 keeps SAGO's sign decisions away from rounding ties, so "same weights" can be checked to
1e-10 (most comparisons are in fact bitwise equal).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from retainfirst.engine import TrainConfig, read_metrics, unlearn
from retainfirst.engine.optim import Float32AdamW
from retainfirst.errors import RetainFirstError
from retainfirst.integrations.transformers import (
    ForgetRetainCollator,
    ForgetRetainDataset,
    UnlearningTrainer,
    UnlearningTrainerMixin,
)

WORKER_PATH = Path(__file__).with_name("trainer_worker.py")
TOLERANCE = 1e-12


def load_worker():
    name = "retainfirst_trainer_test_worker"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, WORKER_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


worker = load_worker()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Single-threaded like the subprocesses: tiny matmuls, and bitwise comparable runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "forget_loss" in entry]


# ----------------------------------------------------------------------------------------------
# Same weights as the engine


@pytest.mark.parametrize(
    ("synthesizer", "max_grad_norm", "adam_eps"),
    [
        ("sum", 1.0, 1e-8),
        ("sago", 1.0, 1e-8),
        # unclipped, and an eps that makes AdamW sensitive to the gradients' scale (accumulation division)
        ("sago", 0.0, 1e-3),
    ],
)
def test_four_steps_match_the_engine(tmp_path, synthesizer, max_grad_norm, adam_eps):
    steps, batch_size, gas = 4, 2, 2
    engine_model = worker.tiny_model()
    # Every setting that changes the numbers is spelled out, on both sides: TrainConfig's defaults are
    # the demo's (alpha=0.1 for SimNPO, lr 5e-5, ...), not UnlearningTrainer's or TrainingArguments'.
    config = TrainConfig(
        steps=steps,
        lr=worker.LR,
        warmup_steps=0,
        lr_schedule="constant",
        weight_decay=0.0,
        betas=(0.9, 0.999),
        adam_eps=adam_eps,
        forget_batch_size=batch_size,
        retain_batch_size=batch_size,
        gradient_accumulation_steps=gas,
        max_grad_norm=max_grad_norm,
        synthesizer=synthesizer,
        alpha=1.0,
        gamma=1.0,
        forget_loss="ga",
        retain_loss="nll",
        mixed_precision="no",
        seed=0,
        disable_progress=True,
        save_final_model=False,
    )
    unlearn(engine_model, worker.TOKENIZER, worker.FORGET, worker.RETAIN, config, tmp_path / "engine")
    initial = weights(worker.tiny_model())

    trainer = worker.run(
        tmp_path / "trainer",
        steps=steps,
        batch_size=batch_size,
        gas=gas,
        synthesizer=synthesizer,
        alpha=1.0,
        gamma=1.0,
        args_overrides={"max_grad_norm": max_grad_norm, "adam_epsilon": adam_eps},
    )

    engine_weights, trainer_weights = weights(engine_model), weights(trainer.model)
    assert max_difference(engine_weights, initial) > 1e-3  # the run did move the weights
    assert max_difference(trainer_weights, engine_weights) <= TOLERANCE
    # the logged metrics are the engine's, step by step (grad_norm is the Trainer's pre-clip norm of u)
    records = read_metrics(tmp_path / "engine" / "metrics.jsonl")
    logs = step_logs(trainer)
    assert [entry["step"] for entry in logs] == [record["step"] for record in records] == [1, 2, 3, 4]
    for entry, record in zip(logs, records, strict=True):
        for key in ("forget_loss", "retain_loss", "conflict_fraction", "cos_update_retain", "norm_update"):
            assert entry[key] == pytest.approx(record[key], rel=1e-9, abs=1e-12), key
        # the synthesizer's stats are float32 sums (one packed vector per reduction), grad_norm is float64
        assert entry["grad_norm"] == pytest.approx(record["norm_update"], rel=1e-6)
        assert entry["loss"] == pytest.approx(record["forget_loss"] + record["retain_loss"], abs=1e-5)
    assert 0 < logs[0]["conflict_fraction"] < 1
    if synthesizer == "sago":
        assert logs[0]["replaced_fraction"] > 0


# ----------------------------------------------------------------------------------------------
# Resume from a Trainer checkpoint


def test_resume_from_checkpoint_continues_identically(tmp_path):
    """4 steps straight == 2 steps, save, a new Trainer (original model) resumed to 4 steps.

    NPO needs the reference model, and the random sampler checks that the data order resumes too.
    """
    common = {
        "steps": 4,
        "batch_size": 2,
        "gas": 2,
        "synthesizer": "sago",
        "forget_loss": "npo",
        "forget_kwargs": {"beta": 0.5},
        "args_overrides": {"save_strategy": "steps", "save_steps": 2, "train_sampling_strategy": "random"},
    }
    straight = worker.run(tmp_path / "straight", **common)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed_model = worker.tiny_model()
    resumed = UnlearningTrainer(
        model=resumed_model,
        args=worker.training_args(
            tmp_path / "resumed",
            steps=4,
            batch_size=2,
            gas=2,
            save_strategy="steps",
            save_steps=2,
            train_sampling_strategy="random",
        ),
        train_dataset=ForgetRetainDataset(worker.FORGET, worker.RETAIN, seed=0, length=16),
        synthesizer="sago",
        forget_loss="npo",
        forget_kwargs={"beta": 0.5},
        retain_loss="nll",
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == 4
    assert max_difference(weights(resumed.model), weights(straight.model)) <= TOLERANCE
    # the reference is the original model, not the checkpoint's: the last steps' losses agree
    straight_logs = {entry["step"]: entry for entry in step_logs(straight)}
    resumed_logs = {entry["step"]: entry for entry in step_logs(resumed)}
    assert sorted(resumed_logs) == [1, 2, 3, 4]  # 1-2 come from the checkpoint's trainer_state.json
    assert resumed.last_unlearning_metrics["forget_loss"] == straight_logs[4]["forget_loss"]
    for step in (3, 4):
        for key in ("forget_loss", "retain_loss", "forget/log_ratio", "conflict_fraction"):
            assert resumed_logs[step][key] == pytest.approx(straight_logs[step][key], rel=1e-9, abs=1e-12)
    assert straight_logs[4]["forget/log_ratio"] != 0


# ----------------------------------------------------------------------------------------------
# TrainingArguments the step must honour


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    plain = worker.run(tmp_path / "plain", steps=2, batch_size=2, gas=2)
    checkpointed = worker.run(
        tmp_path / "gc", steps=2, batch_size=2, gas=2, args_overrides={"activation_checkpointing": True}
    )
    assert checkpointed.model.is_activation_checkpointing
    assert max_difference(weights(checkpointed.model), weights(plain.model)) <= TOLERANCE


def test_bf16_runs_and_logs(tmp_path):
    model = worker.tiny_model(dtype=torch.float32)
    before = weights(model)
    trainer = worker.run(tmp_path, steps=2, batch_size=2, gas=1, model=model, args_overrides={"bf16": True})
    assert trainer.accelerator.mixed_precision == "bf16"
    logs = step_logs(trainer)
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["norm_update"])) for entry in logs)
    assert max_difference(weights(trainer.model), before) > 1e-4
    assert type(inner_optimizer(trainer)) is torch.optim.AdamW  # float32 weights keep the Trainer's own


def inner_optimizer(trainer) -> torch.optim.Optimizer:
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # through accelerate's wrapper


def test_bf16_weights_get_float32_adam_moments_that_survive_resume(tmp_path):
    """A model loaded in bf16: Float32AdamW (bf16 moments cannot decay), moments float32 after a resume."""
    common = {"steps": 4, "batch_size": 2, "gas": 1, "synthesizer": "sum"}
    save_at_2 = {"save_strategy": "steps", "save_steps": 2}
    straight = worker.run(
        tmp_path / "straight", model=worker.tiny_model(torch.bfloat16), args_overrides=save_at_2, **common
    )
    optimizer = inner_optimizer(straight)
    assert type(optimizer) is Float32AdamW
    assert optimizer.param_groups[0]["lr"] == worker.LR and optimizer.param_groups[0]["eps"] == 1e-8
    moments = [optimizer.state[p] for p in straight.model.parameters() if p in optimizer.state]
    assert moments and all(s["exp_avg_sq"].dtype == torch.float32 for s in moments)

    resumed = UnlearningTrainer(
        model=worker.tiny_model(torch.bfloat16),
        args=worker.training_args(tmp_path / "resumed", steps=4, batch_size=2, gas=1, **save_at_2),
        train_dataset=ForgetRetainDataset(worker.FORGET, worker.RETAIN, seed=0, length=8),
        synthesizer="sum",
        forget_loss="ga",
        retain_loss="nll",
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    # bf16 moments on reload (torch's load_state_dict casts to the parameter dtype) would change the weights
    assert max_difference(weights(resumed.model), weights(straight.model)) == 0
    assert max_difference(weights(straight.model), weights(worker.tiny_model(torch.bfloat16))) > 1e-3


def test_report_to_trackers_receive_window_means(tmp_path):
    """Every on_log (what report_to trackers consume) carries the means since the previous log line."""

    class Capture(TrainerCallback):
        def __init__(self):
            self.logs, self.per_step = [], []
            self.trainer = None

        def on_step_end(self, args, state, control, **kwargs):
            self.per_step.append(dict(self.trainer.last_unlearning_metrics))

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    capture = Capture()
    trainer = UnlearningTrainer(
        model=worker.tiny_model(),
        args=worker.training_args(tmp_path, steps=4, batch_size=2, gas=1, logging_steps=2),
        train_dataset=ForgetRetainDataset(worker.FORGET, worker.RETAIN, length=8),
        callbacks=[capture],
    )
    capture.trainer = trainer
    trainer.train()
    logged = [entry for entry in capture.logs if "forget_loss" in entry]
    assert len(logged) == 2 and len(capture.per_step) == 4
    for window, entry in enumerate(logged):
        steps = capture.per_step[2 * window : 2 * window + 2]
        for key in ("forget_loss", "retain_loss", "cos_update_retain", "conflict_fraction"):
            assert entry[key] == pytest.approx((steps[0][key] + steps[1][key]) / 2, rel=1e-12)
    assert all("forget_loss" not in entry for entry in capture.logs if "train_runtime" in entry)


def test_forget_only_equals_sum_with_zero_retain_weight(tmp_path):
    forget_only = worker.run(
        tmp_path / "a", steps=2, batch_size=2, gas=1, synthesizer="sum", retain_loss=None
    )
    zero_retain = worker.run(tmp_path / "b", steps=2, batch_size=2, gas=1, synthesizer="sum", alpha=0.0)
    assert "retain_loss" not in step_logs(forget_only)[0]
    assert max_difference(weights(forget_only.model), weights(zero_retain.model)) <= TOLERANCE
    assert max_difference(weights(forget_only.model), weights(worker.tiny_model())) > 1e-4


def test_peft_model_uses_the_adapter_disabled_model_as_reference(tmp_path):
    from peft import LoraConfig, get_peft_model

    from retainfirst.objectives import AdapterDisabledReference

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(worker.tiny_model(), config)
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    trainer = worker.run(
        tmp_path,
        steps=2,
        batch_size=2,
        gas=1,
        model=peft_model,
        forget_loss="npo",
        forget_kwargs={"beta": 0.5},
    )
    assert isinstance(trainer.reference, AdapterDisabledReference) and trainer.reference.model is peft_model
    for name, p in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_before[name]), name
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert step_logs(trainer)[-1]["forget/log_ratio"] != 0  # the adapters moved away from the reference


def test_trainable_patterns_restrict_the_update(tmp_path):
    before = weights(worker.tiny_model())
    trainer = worker.run(tmp_path, steps=2, batch_size=2, gas=1, trainable_patterns=[r"layers\.1\.mlp\."])
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {f"model.layers.1.mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}


# ----------------------------------------------------------------------------------------------
# An existing Trainer subclass, open-unlearning-style batches and its own loss


PROMPT_TOKENS = 6


def labelled(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-style example: labels = input_ids with -100 on the prompt tokens."""
    labels = example["input_ids"].clone()
    labels[:PROMPT_TOKENS] = -100
    return {**example, "labels": labels}


def with_loss_mask(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    loss_mask = torch.ones_like(example["input_ids"])
    loss_mask[:PROMPT_TOKENS] = 0
    return {**example, "loss_mask": loss_mask}


class PairsWithLabels(torch.utils.data.Dataset):
    """Like open-unlearning's ForgetRetainDataset: {"forget": {..., labels}, "retain": {..., labels}}."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        pair = self.pairs[index]
        return {"forget": labelled(pair["forget"]), "retain": labelled(pair["retain"])}


def stack_side(examples):
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def script_gradient_ascent(model, batch):
    """An existing script's own forget loss: -cross-entropy on the labels (computed in the model's dtype)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return -F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


class ExistingTrainer(Trainer):
    """Stands in for a project's Trainer subclass (e.g. open-unlearning's): it adds its own behaviour."""

    def __init__(self, *args, evaluator_name="kept", **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluator_name = evaluator_name


class MixedTrainer(UnlearningTrainerMixin, ExistingTrainer):
    pass


def test_mixin_on_an_existing_trainer_with_its_own_loss_and_labels(tmp_path):
    pairs = ForgetRetainDataset(worker.FORGET, worker.RETAIN, seed=0, length=8)
    mixed = MixedTrainer(
        model=worker.tiny_model(),
        args=worker.training_args(tmp_path / "mixed", steps=2, batch_size=2, gas=2),
        train_dataset=PairsWithLabels(pairs),
        data_collator=ForgetRetainCollator(collate_fn=stack_side),
        evaluator_name="mine",
        synthesizer="sago",
        forget_loss=script_gradient_ascent,  # the script's loss, on its own batch format
        retain_loss="nll",  # by name: loss_mask comes from labels != -100
    )
    mixed.train()
    assert mixed.evaluator_name == "mine"

    class LossMasked(torch.utils.data.Dataset):
        def __len__(self):
            return len(pairs)

        def __getitem__(self, index):
            return {side: with_loss_mask(example) for side, example in pairs[index].items()}

    reference = UnlearningTrainer(
        model=worker.tiny_model(),
        args=worker.training_args(tmp_path / "reference", steps=2, batch_size=2, gas=2),
        train_dataset=LossMasked(),
        synthesizer="sago",
        forget_loss="ga",
        retain_loss="nll",
    )
    reference.train()
    assert max_difference(weights(mixed.model), weights(reference.model)) <= TOLERANCE
    assert max_difference(weights(mixed.model), weights(worker.tiny_model())) > 1e-4


# ----------------------------------------------------------------------------------------------
# Errors


def test_user_errors_are_one_line_and_early(tmp_path):
    args = worker.training_args(tmp_path, steps=1, batch_size=2, gas=1)
    with pytest.raises(RetainFirstError, match="unknown synthesizer 'sagoo'"):
        UnlearningTrainer(model=worker.tiny_model(), args=args, synthesizer="sagoo")
    with pytest.raises(RetainFirstError, match="forget_kwargs only apply"):
        UnlearningTrainer(
            model=worker.tiny_model(),
            args=args,
            forget_loss=script_gradient_ascent,
            forget_kwargs={"beta": 1},
        )
    from retainfirst.synthesis import get_synthesizer

    with pytest.raises(RetainFirstError, match="alpha, gamma and synthesizer_options only apply"):
        UnlearningTrainer(model=worker.tiny_model(), args=args, synthesizer=get_synthesizer("sum"), alpha=0.5)
    with pytest.raises(RetainFirstError, match="reference must be one of"):
        UnlearningTrainer(model=worker.tiny_model(), args=args, forget_loss="npo", reference="frozen")

    plain = [{"input_ids": example["input_ids"]} for example in worker.FORGET[:4]]
    trainer = UnlearningTrainer(
        model=worker.tiny_model(), args=args, train_dataset=plain, data_collator=stack_side
    )
    with pytest.raises(RetainFirstError, match=r"needs batches \{'forget': batch, 'retain': batch\}"):
        trainer.train()


def test_fp16_is_refused(tmp_path):
    args = worker.training_args(tmp_path, steps=1, batch_size=2, gas=1)
    args.fp16 = (
        True  # TrainingArguments itself refuses fp16 on CPU; the trainer's own check is what is tested
    )
    with pytest.raises(RetainFirstError, match="fp16 is not supported"):
        UnlearningTrainer(model=worker.tiny_model(), args=args)


# ----------------------------------------------------------------------------------------------
# DDP (2 processes, gloo)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
def test_two_process_ddp_matches_one_process(tmp_path):
    """2 ranks x batch 1 == 1 process x batch 2: both stashes are averaged across ranks before synthesis."""
    port = str(free_port())
    ddp_out = tmp_path / "ddp"
    ddp_out.mkdir()
    base_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER_PATH), "--out", str(ddp_out), "--batch-size", "1", "--world", "2"],
            env={
                **base_env,
                "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    single = worker.run(tmp_path / "single", steps=3, batch_size=2, gas=2)

    ddp_weights = load_file(str(ddp_out / "final.safetensors"))
    assert max_difference(ddp_weights, weights(single.model)) <= 1e-9
    ddp_logs = [entry for entry in json.loads((ddp_out / "log.json").read_text()) if "forget_loss" in entry]
    for a, b in zip(ddp_logs, step_logs(single), strict=True):
        for key in ("forget_loss", "retain_loss", "norm_forget", "norm_retain", "conflict_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key  # logged losses/stats are float32
