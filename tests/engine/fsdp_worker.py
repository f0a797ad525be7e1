"""A float64 unlearning run on a tiny Llama with odd-sized weights, alone or sharded by FSDP2 on gloo.

Run as a script by tests/engine/test_fsdp2.py:

    python tests/engine/fsdp_worker.py --out DIR [--fsdp] [--synthesizers sum,sago] [--steps N] ...
        (one run per synthesizer, into DIR/NAME; one launch amortises the imports)
    python tests/engine/fsdp_worker.py --out DIR --mode save|load   (optimizer shards, always FSDP2)

With ``--fsdp`` every process (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment)
shards the model with FSDP2 through accelerate's own ``prepare``. accelerate only selects FSDP on
accelerators, never on a CPU (gloo) process group, so :func:`cpu_fsdp2_accelerator` builds a gloo
Accelerator and switches its distributed type to FSDP; everything after that (``fully_shard``,
the optimizer's parameter swap, the gathered state dict) is accelerate's and torch's real code.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from retainfirst.engine import TrainConfig, unlearn
from retainfirst.models import build_byte_tokenizer, build_tiny_llama

# 257 (vocab: embed_tokens, lm_head) and 97 (mlp) rows do not divide by 2 processes: uneven shards.
VOCAB_SIZE = 257
INTERMEDIATE_SIZE = 97


def fixed_length_examples(tokenizer, count: int, length: int, prefix: str) -> list[dict[str, torch.Tensor]]:
    """``count`` distinct examples of exactly ``length`` tokens (a token mean per rank = the global mean)."""
    examples = []
    for index in range(count):
        text = f"{prefix} {index}: " + "".join(chr(97 + (index * 7 + k * 3) % 26) for k in range(length))
        ids = torch.tensor(tokenizer(text)["input_ids"][:length])
        assert ids.numel() == length
        examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return examples


def tiny_setup(seed: int = 0):
    tokenizer = build_byte_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE
    model = build_tiny_llama(
        VOCAB_SIZE,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=INTERMEDIATE_SIZE,
        seed=seed,
        dtype=torch.float64,
    )
    forget = fixed_length_examples(tokenizer, 8, 16, "secret")
    retain = fixed_length_examples(tokenizer, 8, 16, "public")
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


def cpu_fsdp2_accelerator():
    """A gloo Accelerator whose models accelerate shards with FSDP2 (one FSDP unit per decoder layer)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True,
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    # AcceleratorState copies PartialState's fields each time it is instantiated: switch both.
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2
    return accelerator


def config(args: argparse.Namespace, synthesizer: str) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        lr=1e-3,
        lr_schedule="cosine",
        warmup_steps=1,
        synthesizer=synthesizer,
        forget_loss="ga",
        retain_loss="nll",
        forget_batch_size=args.forget_batch_size,
        retain_batch_size=args.retain_batch_size,
        checkpoint_every=args.checkpoint_every,
        disable_progress=True,
        save_final_model=False,
        weight_decay=0.01,
        max_grad_norm=args.max_grad_norm,
        synthesis_space=args.synthesis_space,
    )


# ---- optimizer shards: save -> SIGKILL -> load ------------------------------------------------


def local_optimizer_state(model, optimizer) -> dict[str, torch.Tensor]:
    """This rank's optimizer tensors (its shard of every moment), flat names -> plain tensors."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer.optimizer)["state"]
    return {
        f"{name}/{key}": (value.to_local() if hasattr(value, "to_local") else value).clone()
        for name, values in state.items()
        for key, value in values.items()
    }


def local_params(model) -> dict[str, torch.Tensor]:
    return {name: p.to_local().detach().clone() for name, p in model.named_parameters()}


def optimizer_shards(args: argparse.Namespace) -> None:
    """``save``: 2 steps, save the shards and the weights, a 3rd step, record it, wait to be killed.
    ``load``: fresh processes rebuild the step-2 model, load the shards, check them, redo step 3."""
    from retainfirst.engine.fsdp import load_sharded_optimizer, save_sharded_optimizer

    out = Path(args.out)
    accelerator = cpu_fsdp2_accelerator()
    rank = accelerator.process_index
    model, _, forget, _ = tiny_setup()
    if args.mode == "load":
        model.load_state_dict(load_file(str(out / "weights-step2.safetensors")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)

    def train_step(step: int) -> None:
        first = (4 * step + 2 * rank) % len(forget)
        ids = torch.stack([forget[(first + k) % len(forget)]["input_ids"] for k in range(2)])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    if args.mode == "save":
        train_step(0)
        train_step(1)
        save_sharded_optimizer(out / "optimizer", optimizer, model)
        weights = {name: p.full_tensor() for name, p in model.named_parameters()}
        if rank == 0:
            save_file(weights, str(out / "weights-step2.safetensors"))
        save_file(local_optimizer_state(model, optimizer), str(out / f"state-rank{rank}.safetensors"))
        train_step(2)
        save_file(local_params(model), str(out / f"final-rank{rank}.safetensors"))
        (out / f"rank{rank}.done").touch()
        time.sleep(600)  # the test SIGKILLs both ranks here
        return

    load_sharded_optimizer(out / "optimizer", optimizer, model)
    expected = load_file(str(out / f"state-rank{rank}.safetensors"))
    restored = local_optimizer_state(model, optimizer)
    assert restored.keys() == expected.keys(), sorted(set(restored) ^ set(expected))[:5]
    for key, tensor in expected.items():
        assert torch.equal(restored[key], tensor), f"rank {rank}: {key} differs after loading"
    train_step(2)
    expected_final = load_file(str(out / f"final-rank{rank}.safetensors"))
    for name, tensor in local_params(model).items():
        assert torch.equal(tensor, expected_final[name]), (
            f"rank {rank}: {name} differs after the resumed step"
        )
    (out / f"rank{rank}.verified").write_text(f"{len(expected)} optimizer tensors\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--synthesizers", default="sum")
    parser.add_argument("--forget-batch-size", type=int, default=2)
    parser.add_argument("--retain-batch-size", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--mode", choices=("run", "save", "load"), default="run")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds after each forget loss")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--synthesis-space", choices=("gradient", "update"), default="gradient")
    args = parser.parse_args(argv)
    if args.mode != "run":
        optimizer_shards(args)
        return
    if args.sleep:  # slow steps, so that a test can kill the run between two checkpoints
        import retainfirst.objectives as objectives

        real = objectives.get_forget_objective
        objectives.get_forget_objective = lambda name, **kw: SlowObjective(real(name, **kw), args.sleep)
    for synthesizer in args.synthesizers.split(","):
        model, tokenizer, forget, retain = tiny_setup()
        accelerator = cpu_fsdp2_accelerator() if args.fsdp else None
        out = Path(args.out) / synthesizer
        unlearn(
            model,
            tokenizer,
            forget,
            retain,
            config(args, synthesizer),
            out,
            resume=args.resume,
            accelerator=accelerator,
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
