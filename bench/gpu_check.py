"""One-GPU check on a Zephyr-7B-shaped model: step time, synthesis share, peak memory, released-code combine.

    python bench/gpu_check.py                                  # one GPU, layers chosen to fit
    python bench/gpu_check.py --layers 8 --steps 3 --json out.json
    python bench/gpu_check.py --device cpu --tiny --steps 2    # what the test suite runs

Builds a Mistral model with Zephyr-7B-beta's shape (32000 vocab, 4096 hidden, 14336 MLP, 32 heads,
8 KV heads) and random bf16 weights directly on the device: no download, no network. For each of
``sum``, ``pcgrad`` and ``sago`` it runs ``1 + --steps`` two-pass steps (GA forget, NLL retain)
through ``retainfirst.engine.unlearn`` with the engine's default optimizer (step 1 is a warmup and
is dropped), then computes one forget/retain gradient pair and combines it twice: with the
synthesizer (in place, chunked) and the way the released code does it (clone both gradient lists,
select with boolean-mask indexing), timing both and measuring the extra memory of each.

Memory. A full step holds the bf16 weights (2 B/param), two bf16 gradient sets (4 B) and AdamW's
two float32 moments (8 B); the released-code combine adds three gradient copies (6 B). The check
runs these phases one after the other, but the layer count is chosen as if they all coexisted
(20 B/param), within 90% of the device's memory less an allowance for activations, so that it
cannot run out of memory; the arithmetic is printed. Checkpoints are not written: the engine's
final checkpoint of a 7B model with float32 moments (~72 GB) exceeds the GPU machine's disk, and
writing it is not what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

SYNTHESIZERS = ("sum", "pcgrad", "sago")
GIB = 2**30
NOMINAL_DEVICE_GIB = 139.0  # one H200 as this project gets it; the arithmetic for a CPU run uses it
MEMORY_FRACTION = 0.9
ACTIVATION_ALLOWANCE_GIB = 6.0
EPS = 1e-10  # pcgrad's default eps, as in retainfirst.synthesis
# bytes per parameter: weights bf16, 2 gradient sets bf16, 2 float32 moments, 3 released-code copies
BYTES_PER_PARAM = {"weights (bf16)": 2, "gradients x2 (bf16)": 4, "AdamW moments x2 (fp32)": 8}
RELEASED_COPIES_BYTES = 6


def zephyr_config(layers: int | None = None) -> Any:
    """Zephyr-7B-beta's architecture (Mistral-7B-v0.1), optionally with fewer decoder layers."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32 if layers is None else layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        sliding_window=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_config() -> Any:
    """A Mistral small enough for a CPU test, with the same structure (GQA, untied head)."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def parameter_count(config: Any, layers: int) -> int:
    """Parameters of a Mistral with ``layers`` decoder layers (no biases, untied head)."""
    hidden, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    attention = 2 * hidden * config.num_attention_heads * config.head_dim + 2 * hidden * kv
    per_layer = attention + 3 * hidden * config.intermediate_size + 2 * hidden
    return 2 * config.vocab_size * hidden + hidden + layers * per_layer


def bytes_all_at_once(params: int) -> int:
    return params * (sum(BYTES_PER_PARAM.values()) + RELEASED_COPIES_BYTES)


def choose_layers(config: Any, device_bytes: int) -> int:
    """The most decoder layers whose all-at-once estimate fits 90% of the device less activations."""
    budget = MEMORY_FRACTION * device_bytes - ACTIVATION_ALLOWANCE_GIB * GIB
    fitting = [
        k
        for k in range(1, config.num_hidden_layers + 1)
        if bytes_all_at_once(parameter_count(config, k)) <= budget
    ]
    if not fitting:
        raise SystemExit(f"gpu_check: even one layer needs more than {budget / GIB:.1f} GiB; pass --layers")
    return fitting[-1]


def memory_arithmetic(config: Any, device_bytes: int, layers: int) -> list[str]:
    """The printed estimate: the full model's needs, the budget and the slice that fits it."""
    full = config.num_hidden_layers
    params = parameter_count(config, full)
    lines = [f"memory estimate for the full model ({full} layers, {params / 1e9:.2f}B parameters):"]
    for label, per_param in BYTES_PER_PARAM.items():
        lines.append(f"  {label:<32} {per_param} B/param = {params * per_param / 1e9:6.1f} GB")
    step = params * sum(BYTES_PER_PARAM.values())
    lines.append(f"  {'engine step total':<32} {step / 1e9:6.1f} GB = {step / GIB:.1f} GiB")
    copies = params * RELEASED_COPIES_BYTES
    lines.append(f"  {'released combine: 3 grad copies':<32} {copies / 1e9:6.1f} GB")
    total = bytes_all_at_once(params)
    budget = MEMORY_FRACTION * device_bytes - ACTIVATION_ALLOWANCE_GIB * GIB
    lines.append(f"  {'all at once':<32} {total / 1e9:6.1f} GB = {total / GIB:.1f} GiB")
    lines.append(
        f"budget: {MEMORY_FRACTION:.0%} of {device_bytes / GIB:.1f} GiB - {ACTIVATION_ALLOWANCE_GIB:.0f} GiB "
        f"activations = {budget / GIB:.1f} GiB"
    )
    engine_gib = (step + ACTIVATION_ALLOWANCE_GIB * GIB) / GIB
    combine_gib = params * (BYTES_PER_PARAM["weights (bf16)"] + BYTES_PER_PARAM["gradients x2 (bf16)"])
    combine_gib = (combine_gib + copies) / GIB
    lines.append(
        f"(the phases run one after the other: engine step ~{engine_gib:.1f} GiB with activations, without "
        f"the optimizer's temporaries; released combine ~{combine_gib:.1f} GiB; --layers {full} tries them)"
    )
    sliced = bytes_all_at_once(parameter_count(config, layers))
    lines.append(
        f"layers: {layers} of {full} ({parameter_count(config, layers) / 1e9:.2f}B parameters, "
        f"all at once {sliced / GIB:.1f} GiB)"
    )
    return lines


def build_model(config: Any, device: torch.device) -> torch.nn.Module:
    """Random bf16 weights allocated on ``device`` directly (a 7B model never passes through host RAM)."""
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16)


def random_examples(count: int, tokens: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, tokens), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]


# -- the engine run ------------------------------------------------------------------------------


class OptimizerProbe:
    """Records the optimizer class and the dtypes of its state tensors at every step (a global hook)."""

    def __init__(self) -> None:
        self.name = ""
        self.state_dtypes: set[str] = set()

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.name = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    self.state_dtypes.add(str(value.dtype).removeprefix("torch."))


@contextlib.contextmanager
def final_checkpoint_skipped():
    """Let the engine skip writing checkpoints (see the module docstring); restored on exit."""
    from retainfirst.engine import checkpoint

    writer = getattr(checkpoint, "CheckpointWriter", None)
    if writer is None or not callable(getattr(writer, "save", None)):
        raise RuntimeError(
            "retainfirst.engine.checkpoint.CheckpointWriter.save is gone: update final_checkpoint_skipped"
        )
    original = writer.save
    writer.save = lambda self, step, *args, **kwargs: None
    try:
        yield
    finally:
        writer.save = original


def engine_run(model, synthesizer: str, args, examples: tuple[list, list], device: torch.device) -> dict:
    from accelerate import Accelerator
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from retainfirst.engine import TrainConfig, read_metrics, unlearn

    config = TrainConfig(
        steps=1 + args.steps,
        lr=1e-6,
        synthesizer=synthesizer,
        forget_loss="ga",
        retain_loss="nll",
        forget_batch_size=args.batch,
        retain_batch_size=args.batch,
        disable_progress=True,
        save_final_model=False,
    )
    accelerator = Accelerator(cpu=device.type == "cpu")
    probe = OptimizerProbe()
    hook = register_optimizer_step_post_hook(probe)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)  # the engine only reads the pad id
    try:
        with final_checkpoint_skipped(), tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
            result = unlearn(model, tokenizer, *examples, config, out, accelerator=accelerator)
            records = read_metrics(result.metrics_path)[1:]  # step 1 warms up
    finally:
        hook.remove()
    del result
    gc.collect()
    step = statistics.median(r["seconds_per_step"] for r in records)
    synthesis = statistics.median(r["synthesis_seconds"] for r in records)
    row = {
        "step_seconds": step,
        "synthesis_seconds": synthesis,
        "synthesis_share": synthesis / step if step > 0 else math.nan,
        "optimizer": probe.name,
        "optimizer_state_dtype": ",".join(sorted(probe.state_dtypes)) or "none",
        "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.empty_cache()
    else:  # the process's high-water mark (ru_maxrss is KiB on Linux), not this run's alone
        row["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


# -- the combine, both ways ------------------------------------------------------------------------


def released_combine(name: str, forget_grads, retain_grads, alpha: float = 1.0, gamma: float = 1.0):
    """The released code's combine: clone both lists, compute in the gradients' dtype, boolean masks."""
    forget = [g.clone() for g in forget_grads]
    retain = [g.clone() for g in retain_grads]
    update = []
    for f, r in zip(forget, retain, strict=True):
        if name == "sum":
            update.append(gamma * f + alpha * r)
        elif name == "pcgrad":
            dot = (f * r).sum()
            if dot < 0:
                f -= dot / (r.norm() ** 2 + EPS) * r
            update.append(gamma * f + alpha * r)
        elif name == "sago":
            conflict = (torch.sign(f) * torch.sign(r)) < 0
            u = gamma * f
            u[conflict] = alpha * r[conflict]
            update.append(u)
        else:
            raise ValueError(name)
    return update


def gradient_pair(model, examples: tuple[list, list], batch: int, device: torch.device):
    """One GA forget gradient and one NLL retain gradient of the whole model, as two lists."""
    params = [p for p in model.parameters() if p.requires_grad]
    pair = []
    for sign, stream in ((-1.0, examples[0]), (1.0, examples[1])):
        ids = torch.stack([e["input_ids"] for e in stream[:batch]]).to(device)
        (sign * model(input_ids=ids, labels=ids).loss).backward()
        pair.append([p.grad for p in params])
        for p in params:
            p.grad = None
    return pair


def timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    extra = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
    return out, seconds, extra


def compare_combines(model, name: str, args, examples, device: torch.device) -> dict:
    from retainfirst.synthesis import get_synthesizer

    forget, retain = gradient_pair(model, examples, args.batch, device)
    grad_bytes = sum(g.numel() * g.element_size() for g in forget)
    released, released_seconds, released_extra = timed(device, lambda: released_combine(name, forget, retain))
    synthesizer = get_synthesizer(name, 1.0, 1.0)
    (update, _), ours_seconds, ours_extra = timed(device, lambda: synthesizer.combine(forget, retain))
    scale = max(float(r.float().abs().max()) for r in released)
    worst = max(float((u.float() - r.float()).abs().max()) for u, r in zip(update, released, strict=True))
    row = {
        "combine_seconds": ours_seconds,
        "released_combine_seconds": released_seconds,
        "combine_extra_grad_copies": None if ours_extra is None else ours_extra / grad_bytes,
        "released_extra_grad_copies": None if released_extra is None else released_extra / grad_bytes,
        "max_rel_diff_vs_released": worst / scale if scale > 0 else worst,
    }
    return row


# -- report ----------------------------------------------------------------------------------------


@dataclass
class Header:
    device: str
    model: str
    layers: int
    total_layers: int
    parameters: int
    tokens_per_pass: int
    steps_measured: int


def table(rows: list[dict]) -> str:
    columns = [
        ("synthesizer", "{}"),
        ("step_seconds", "{:.4f}"),
        ("synthesis_share", "{:.1%}"),
        ("peak_memory_gib", "{:.2f}"),
        ("optimizer_state_dtype", "{}"),
        ("combine_seconds", "{:.4f}"),
        ("released_combine_seconds", "{:.4f}"),
        ("combine_extra_grad_copies", "{:.2f}"),
        ("released_extra_grad_copies", "{:.2f}"),
        ("max_rel_diff_vs_released", "{:.1e}"),
    ]
    cells = [[name for name, _ in columns]]
    for row in rows:
        cells.append(["-" if row[name] is None else fmt.format(row[name]) for name, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in cells
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small Mistral instead of the 7B shape")
    parser.add_argument(
        "--steps", type=int, default=3, help="measured steps per synthesizer (after 1 warmup)"
    )
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: as many as fit)")
    parser.add_argument("--batch", type=int, default=4, help="examples per pass")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per example")
    parser.add_argument("--synthesizers", default=",".join(SYNTHESIZERS))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --device cpu (with --tiny)")
    device = torch.device(args.device)
    if args.tiny:
        args.tokens = min(args.tokens, 32)

    full_config = zephyr_config()
    device_bytes = torch.cuda.mem_get_info()[1] if device.type == "cuda" else int(NOMINAL_DEVICE_GIB * GIB)
    layers_7b = args.layers if args.layers is not None else choose_layers(full_config, device_bytes)
    for line in memory_arithmetic(full_config, device_bytes, layers_7b):
        print(line)
    config = tiny_config() if args.tiny else zephyr_config(layers_7b)
    if args.tiny and args.layers is not None:
        config.num_hidden_layers = args.layers

    start = time.perf_counter()
    model = build_model(config, device)
    params = sum(p.numel() for p in model.parameters())
    build_seconds = time.perf_counter() - start
    header = Header(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        model="tiny Mistral" if args.tiny else "Zephyr-7B-shaped Mistral",
        layers=config.num_hidden_layers,
        total_layers=2 if args.tiny else full_config.num_hidden_layers,
        parameters=params,
        tokens_per_pass=args.batch * args.tokens,
        steps_measured=args.steps,
    )
    print(
        f"{header.model} on {header.device}: {header.layers}/{header.total_layers} layers, "
        f"{params / 1e6:.1f}M parameters (bf16, built in {build_seconds:.1f} s); "
        f"{args.batch} x {args.tokens} tokens per pass, {args.steps} measured steps"
    )
    examples = (
        random_examples(4 * args.batch, args.tokens, config.vocab_size, seed=1),
        random_examples(4 * args.batch, args.tokens, config.vocab_size, seed=2),
    )
    rows = []
    for name in args.synthesizers.split(","):
        row = {"synthesizer": name}
        row.update(engine_run(model, name, args, examples, device))
        row.update(compare_combines(model, name, args, examples, device))
        gc.collect()  # the gradient pair and both updates
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {name}: done after {time.perf_counter() - start:.1f} s", flush=True)
    print(table(rows))
    if rows and rows[0]["optimizer_state_dtype"] != "float32":
        print(
            f"note: the optimizer ({rows[0]['optimizer']}) keeps its moments in "
            f"{rows[0]['optimizer_state_dtype']}, not float32"
        )
    result = {
        "header": asdict(header),
        "memory_estimate": memory_arithmetic(full_config, device_bytes, layers_7b),
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    if args.json is not None:
        from retainfirst.io import atomic_write_json

        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
