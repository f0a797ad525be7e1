"""A tiny float64 unlearning run with UnlearningTrainer, shared by the tests and their DDP subprocesses.

Run as a script (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment for DDP on gloo):

    python tests/integrations/trainer_worker.py --out DIR --batch-size 1 --steps 3 --gas 2

It writes the final weights to DIR/final.safetensors (rank 0) and the log history to DIR/log.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from retainfirst.integrations.transformers import ForgetRetainDataset, UnlearningTrainer
from retainfirst.models import build_byte_tokenizer, build_tiny_llama

TOKENIZER = build_byte_tokenizer()
LR = 1e-3


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    return build_tiny_llama(
        len(TOKENIZER),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=128,
        seed=seed,
        dtype=dtype,
    )


def fixed_length_examples(count: int, length: int, prefix: str) -> list[dict[str, torch.Tensor]]:
    """``count`` distinct examples of exactly ``length`` tokens (equal lengths: mean of means = mean)."""
    examples = []
    for index in range(count):
        text = f"{prefix} {index}: " + "".join(chr(97 + (index * 7 + k * 3) % 26) for k in range(length))
        ids = torch.tensor(TOKENIZER(text)["input_ids"][:length])
        assert ids.numel() == length
        examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return examples


FORGET = fixed_length_examples(12, 24, "secret")
RETAIN = fixed_length_examples(12, 24, "public")


def training_args(
    out: str | Path, *, steps: int, batch_size: int, gas: int, **overrides: Any
) -> TrainingArguments:
    """AdamW without weight decay, constant LR, no warmup, clip 1.0, seed 0, sequential order.

    A test comparing with ``retainfirst.engine.unlearn`` must give its TrainConfig the same values
    explicitly (and alpha = gamma = 1, UnlearningTrainer's defaults): TrainConfig's defaults are the
    demo's, not these.
    """
    values = {
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": gas,
        "learning_rate": LR,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "train_sampling_strategy": "sequential",
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def run(
    out: str | Path,
    *,
    steps: int,
    batch_size: int,
    gas: int,
    synthesizer: str = "sago",
    model: torch.nn.Module | None = None,
    world: int = 1,
    args_overrides: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> UnlearningTrainer:
    """Train ``steps`` optimizer steps on engine-ordered pairs (global batch = batch_size x world)."""
    model = tiny_model() if model is None else model
    dataset = ForgetRetainDataset(FORGET, RETAIN, seed=0, length=steps * batch_size * world * gas)
    args = training_args(out, steps=steps, batch_size=batch_size, gas=gas, **(args_overrides or {}))
    kwargs = {"forget_loss": "ga", "retain_loss": "nll", **trainer_kwargs}
    trainer = UnlearningTrainer(
        model=model, args=args, train_dataset=dataset, synthesizer=synthesizer, **kwargs
    )
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--gas", type=int, default=2)
    parser.add_argument("--synthesizer", default="sago")
    parser.add_argument("--world", type=int, default=1)
    options = parser.parse_args(argv)
    out = Path(options.out)
    trainer = run(
        out,
        steps=options.steps,
        batch_size=options.batch_size,
        gas=options.gas,
        synthesizer=options.synthesizer,
        world=options.world,
        args_overrides={"ddp_backend": "gloo"} if options.world > 1 else None,
    )
    if trainer.args.process_index == 0:
        state = {name: p.detach().clone().contiguous() for name, p in trainer.model.named_parameters()}
        save_file(state, str(out / "final.safetensors"))
        (out / "log.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
