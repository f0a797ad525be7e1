"""Benchmark: greedy probe generation with and without the shared prefix KV cache, same probes.

Loads SmolLM2-135M and the facts benchmark the demo evaluates (the cached build for the default
config, or ``--benchmark FILE``), formats every probe family as ``evaluate_generation`` does (chat
template + RWKU instruction), and runs ``generate_greedy`` per family exactly as the facts task does
(demo ``max_new_tokens`` and ``batch_size``), once with ``share_prefix=False`` and once with
``share_prefix=True``. Reported: seconds of each, their ratio, and the probes whose answers differ
(expected 0; any are printed). A short warm-up call runs first.

    .venv/bin/python bench/generation.py
    .venv/bin/python bench/generation.py --benchmark run/benchmark.json --json out.json
"""

from __future__ import annotations

import argparse
import time

import torch

from retainfirst.config import RunConfig
from retainfirst.evals.generation import format_prompt, generate_greedy, resolve_prompt_format
from retainfirst.models import load_model


def family_prompts(bench, tokenizer, settings: dict) -> dict[str, list[str]]:
    resolved = resolve_prompt_format(tokenizer, settings.get("prompt_format", "auto"))
    return {
        family: [format_prompt(probe, tokenizer, resolved) for probe in probes]
        for family, probes in bench.probes.items()
        if probes
    }


def run(model, tokenizer, prompts: dict[str, list[str]], options: dict, share: bool) -> tuple[float, dict]:
    start = time.perf_counter()
    answers = {
        family: generate_greedy(model, tokenizer, texts, share_prefix=share, **options)
        for family, texts in prompts.items()
    }
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--benchmark", help="a saved facts benchmark JSON (default: the demo's cached build)")
    parser.add_argument("--families", help="comma-separated probe families (default: all)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    config = RunConfig(model=args.model)
    model, tokenizer = load_model(args.model)
    model.eval()
    if args.benchmark:
        from retainfirst.benchmarks.facts import FactBenchmark

        bench = FactBenchmark.load(args.benchmark)
    else:
        from retainfirst.experiment.prepare import fact_benchmark

        bench = fact_benchmark(config, model, tokenizer, None)
    settings = {"max_new_tokens": config.eval.max_new_tokens, **bench.eval_settings}
    resolved = resolve_prompt_format(tokenizer, settings.get("prompt_format", "auto"))
    options = {
        "max_new_tokens": settings["max_new_tokens"],
        "batch_size": config.eval.batch_size,
        "stop_at_newline": settings.get("stop_at_newline", True),
        "add_special_tokens": resolved == "raw",
    }
    prompts = family_prompts(bench, tokenizer, settings)
    if args.families:
        prompts = {name: prompts[name] for name in args.families.split(",")}
    total = sum(len(texts) for texts in prompts.values())
    threads = torch.get_num_threads()
    print(
        f"{total} probes in {len(prompts)} families; options {options}; torch threads {threads}", flush=True
    )

    warmup = {name: texts[:4] for name, texts in list(prompts.items())[:1]}
    run(model, tokenizer, warmup, options, share=False)
    run(model, tokenizer, warmup, options, share=True)
    plain_s, plain = run(model, tokenizer, prompts, options, share=False)
    print(f"plain  {plain_s:7.1f} s", flush=True)
    shared_s, shared = run(model, tokenizer, prompts, options, share=True)

    differ = [
        (family, index, prompts[family][index], plain[family][index], shared[family][index])
        for family in prompts
        for index in range(len(prompts[family]))
        if plain[family][index] != shared[family][index]
    ]
    print(f"shared {shared_s:7.1f} s   ratio plain/shared {plain_s / shared_s:.2f}")
    print(f"answers that differ: {len(differ)} of {total}")
    for family, index, prompt, before, after in differ:
        print(f"  {family}[{index}] {prompt[-60:]!r}: plain {before!r} shared {after!r}")
    if args.json:
        from retainfirst.io import atomic_write_json

        atomic_write_json(
            args.json,
            {
                "probes": total,
                "options": options,
                "threads": threads,
                "plain_s": plain_s,
                "shared_s": shared_s,
                "differ": [list(d) for d in differ],
            },
        )


if __name__ == "__main__":
    main()
