"""Seconds per unlearning step by synthesizer, as a ratio to the plain `sum` step of the same run.

Each (model, synthesizer) pair runs ``1 + --steps`` optimizer steps of ``retainfirst.engine.unlearn``
(GA forget, NLL retain, batch 4 x --tokens tokens for both streams) in its own subprocess, so the
peak RSS it reports belongs to that configuration alone. The first step is a warmup and is dropped.

    python bench/step.py --steps 3                      # tiny model and SmolLM2-135M
    python bench/step.py --models tiny --steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SYNTHESIZERS = ("sum", "pcgrad", "pcgrad_global", "sago")
MODELS = ("tiny", "smollm2-135m")


def load(model_name: str):
    from retainfirst.models import build_byte_tokenizer, build_tiny_llama, load_model

    if model_name == "tiny":
        tokenizer = build_byte_tokenizer()
        return build_tiny_llama(len(tokenizer), seed=0), tokenizer
    return load_model(model_name)


def examples(tokenizer, count: int, tokens: int, topic: str):
    """``count`` distinct examples of exactly ``tokens`` tokens, built from generated sentences."""
    import torch

    out = []
    for index in range(count):
        words = []
        k = 0
        while True:
            words.append(
                f"In record {index}.{k} the {topic} number {(index * 7919 + k * 104729) % 99991} was noted."
            )
            ids = tokenizer(" ".join(words))["input_ids"]
            if len(ids) >= tokens:
                break
            k += 1
        ids = torch.tensor(ids[:tokens])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def measure_one(model_name: str, synthesizer: str, steps: int, tokens: int, batch: int) -> dict:
    """Run in this process; returns mean timings over the steps after the warmup and the peak RSS."""
    from retainfirst.engine import TrainConfig, read_metrics, unlearn

    model, tokenizer = load(model_name)
    forget = examples(tokenizer, 4 * batch, tokens, "secret")
    retain = examples(tokenizer, 4 * batch, tokens, "public")
    config = TrainConfig(
        steps=1 + steps,
        lr=1e-5,
        synthesizer=synthesizer,
        forget_loss="ga",
        retain_loss="nll",
        forget_batch_size=batch,
        retain_batch_size=batch,
        disable_progress=True,
        save_final_model=False,
    )
    with tempfile.TemporaryDirectory(prefix="bench-step-") as out:
        records = read_metrics(unlearn(model, tokenizer, forget, retain, config, out).metrics_path)[1:]
    step_seconds = statistics.median(r["seconds_per_step"] for r in records)
    synthesis_seconds = statistics.median(r["synthesis_seconds"] for r in records)
    return {
        "model": model_name,
        "synthesizer": synthesizer,
        "params": sum(p.numel() for p in model.parameters()),
        "steps_timed": len(records),
        "seconds_per_step": step_seconds,
        "synthesis_seconds": synthesis_seconds,
        "synthesis_share": synthesis_seconds / step_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": __import__("torch").get_num_threads(),
    }


def run_subprocess(model_name: str, synthesizer: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--one", model_name, synthesizer, "--steps", str(args.steps)]
    command += ["--tokens", str(args.tokens), "--batch", str(args.batch), "--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{model_name}/{synthesizer} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| model | synthesizer | s/step | x sum | synthesis s | synthesis share | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['synthesizer']} | {row['seconds_per_step']:.3f} | "
            f"{row['ratio_to_sum']:.2f} | {row['synthesis_seconds']:.4f} | "
            f"{100 * row['synthesis_share']:.1f}% | {row['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--synthesizers", default=",".join(SYNTHESIZERS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warmup step")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0 = torch's default); 1 is steadier on a busy box",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SYNTHESIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(measure_one(*args.one, args.steps, args.tokens, args.batch)))
        return
    synthesizers = args.synthesizers.split(",")
    if "sum" not in synthesizers:
        synthesizers.insert(0, "sum")
    rows = []
    for model_name in args.models.split(","):
        model_rows = [run_subprocess(model_name, name, args) for name in synthesizers]
        base = next(r["seconds_per_step"] for r in model_rows if r["synthesizer"] == "sum")
        for row in model_rows:
            row["ratio_to_sum"] = row["seconds_per_step"] / base
            print(json.dumps(row), file=sys.stderr)
        rows += model_rows
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
