"""A small unlearning run on the tiny Llama, shared by the in-process tests and their subprocesses.

Run as a script for the multiprocess tests (SIGKILL + resume, 2-process DDP on gloo):

    python tests/engine/engine_worker.py --out DIR [--steps N] [--resume] [--sleep S] ...

Distributed runs get RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment; accelerate
picks them up and uses gloo on CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from retainfirst.engine import TrainConfig, unlearn
from retainfirst.models import build_byte_tokenizer, build_tiny_llama


def fixed_length_examples(tokenizer, count: int, length: int, prefix: str) -> list[dict[str, torch.Tensor]]:
    """``count`` distinct examples of exactly ``length`` tokens (byte tokenizer: one token per char).

    Equal lengths make a token-mean over one batch equal to the mean of per-shard means, which the
    gradient-accumulation and DDP equivalence tests rely on.
    """
    examples = []
    for index in range(count):
        text = f"{prefix} {index}: " + "".join(chr(97 + (index * 7 + k * 3) % 26) for k in range(length))
        ids = torch.tensor(tokenizer(text)["input_ids"][:length])
        assert ids.numel() == length
        examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return examples


def tiny_setup(dropout: float = 0.0, seed: int = 0):
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(
        len(tokenizer), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=seed
    )
    if dropout:
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = dropout
    forget = fixed_length_examples(tokenizer, 12, 24, "secret")
    retain = fixed_length_examples(tokenizer, 12, 24, "public")
    return model, tokenizer, forget, retain


class SlowObjective:
    """Wraps an objective and sleeps after each loss, so a subprocess can be killed part-way."""

    def __init__(self, inner, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def loss(self, model, batch, reference=None):
        time.sleep(self.seconds)
        return self.inner.loss(model, batch, reference)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--synthesizer", default="pcgrad")
    parser.add_argument("--forget-batch-size", type=int, default=2)
    parser.add_argument("--retain-batch-size", type=int, default=2)
    parser.add_argument("--gas", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if args.sleep:
        import retainfirst.objectives as objectives

        real = objectives.get_forget_objective
        objectives.get_forget_objective = lambda name, **kw: SlowObjective(real(name, **kw), args.sleep)
    model, tokenizer, forget, retain = tiny_setup(args.dropout)
    config = TrainConfig(
        steps=args.steps,
        lr=1e-3,
        lr_schedule="cosine",
        warmup_steps=1,
        synthesizer=args.synthesizer,
        forget_loss="ga",
        retain_loss="nll",
        forget_batch_size=args.forget_batch_size,
        retain_batch_size=args.retain_batch_size,
        gradient_accumulation_steps=args.gas,
        checkpoint_every=args.checkpoint_every,
        disable_progress=True,
        save_final_model=False,
        weight_decay=0.01,
    )
    unlearn(model, tokenizer, forget, retain, config, args.out, resume=args.resume)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
