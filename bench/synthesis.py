"""Benchmark the synthesizers on a SmolLM2-135M-shaped gradient set: time and peak extra memory.

    python bench/synthesis.py [--quick] [--strategies sum,sago] [--device cpu|cuda]

Each (strategy, implementation) pair runs in a fresh subprocess that builds two float32 gradient
lists with SmolLM2-135M's 272 parameter shapes (134.5M elements each), then combines them:

* ``retainfirst``: ``get_synthesizer(name).combine(forget, retain)`` (in place, with stats);
* ``naive``: clone both lists and build a third combined list tensor by tensor, as the published
  code does (no stats).

Peak extra memory: on CPU, the process's peak RSS after the combine minus the RSS just before it
(tracemalloc cannot see torch's allocations; the kernel's peak mark VmHWM is reset to the current
RSS right before the combine via /proc/self/clear_refs, else ``ru_maxrss`` gives only an upper
bound, printed with "<="); on CUDA,
``torch.cuda.max_memory_allocated`` minus the allocation before. It is reported in units of one
gradient copy (134.5M float32 = 538 MB). The first combine is the one measured for memory; the time
is the median over the repeats (the gradients are combined again in place, which costs the same).
The same run times one forward+backward of SmolLM2-135M on 4x128 tokens for scale.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch

EPS = 1e-10
STRATEGIES = ["sum", "pcgrad", "pcgrad_global", "blur", "sago", "sago_prefer_retain", "retain_only"]


# -- the plain implementations the published code uses: clone both lists, build a third one ------


def _naive_linear_projection(forget, retain, name, alpha, gamma):
    if name == "pcgrad":
        out = []
        for f, r in zip(forget, retain, strict=True):
            dot = float((f * r).sum())
            if dot < 0:
                f = f - dot / (float(r.norm()) ** 2 + EPS) * r
            out.append(gamma * f + alpha * r)
        return out
    dot = sum(float((f * r).sum()) for f, r in zip(forget, retain, strict=True))
    if name == "pcgrad_global":
        retain_sq = sum(float(r.norm()) ** 2 for r in retain)
        if dot < 0:
            forget = [f - dot / (retain_sq + EPS) * r for f, r in zip(forget, retain, strict=True)]
        return [gamma * f + alpha * r for f, r in zip(forget, retain, strict=True)]
    forget_sq = sum(float(f.norm()) ** 2 for f in forget)  # blur
    retain = [r - dot / (forget_sq + EPS) * f for f, r in zip(forget, retain, strict=True)]
    return [gamma * f + alpha * r for f, r in zip(forget, retain, strict=True)]


def naive_combine(name, forget_grads, retain_grads, alpha=1.0, gamma=1.0):
    forget = [g.clone() for g in forget_grads]
    retain = [g.clone() for g in retain_grads]
    if name in ("pcgrad", "pcgrad_global", "blur"):
        return _naive_linear_projection(forget, retain, name, alpha, gamma)
    out = []
    for f, r in zip(forget, retain, strict=True):
        if name == "sum":
            out.append(gamma * f + alpha * r)
        elif name == "retain_only":
            out.append(alpha * r)
        else:
            conflict = torch.sign(f) * torch.sign(r) < 0
            other = gamma * f if name == "sago" else gamma * f + alpha * r
            out.append(torch.where(conflict, alpha * r, other))
    return out


# -- worker: one measurement in a fresh process ---------------------------------------------------


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(name: str, impl: str, shapes: list[list[int]], repeats: int, device: str) -> dict:
    from retainfirst.synthesis import get_synthesizer

    generator = torch.Generator(device=device).manual_seed(0)
    forget = [torch.randn(shape, generator=generator, device=device) for shape in shapes]
    retain = [torch.randn(shape, generator=generator, device=device) for shape in shapes]
    grad_bytes = sum(g.numel() * g.element_size() for g in forget)
    synthesizer = get_synthesizer(name, alpha=1.0, gamma=1.0)

    def run_once():
        if impl == "naive":
            return naive_combine(name, forget, retain), {}
        return synthesizer.combine(forget, retain)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss()
        peak_before = before if _reset_peak_rss() else _peak_rss()
    start = time.perf_counter()
    result = run_once()
    sync()
    times = [time.perf_counter() - start]
    if device == "cuda":
        extra = torch.cuda.max_memory_allocated() - before
        floor = 0
    else:
        extra = _peak_rss() - before
        floor = max(0, peak_before - before)  # an earlier peak hides extras below this
    del result
    for _ in range(repeats - 1):
        start = time.perf_counter()
        result = run_once()
        sync()
        times.append(time.perf_counter() - start)
        del result
    return {
        "name": name,
        "impl": impl,
        "seconds": statistics.median(times),
        "extra_bytes": max(0, extra),
        "floor_bytes": floor,
        "grad_bytes": grad_bytes,
    }


def measure(name: str, impl: str, shapes: list[list[int]], repeats: int, device: str) -> dict:
    """Run :func:`worker` in a fresh interpreter so peak RSS belongs to this measurement alone."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        impl,
        str(repeats),
        device,
        str(torch.get_num_threads()),
    ]
    done = subprocess.run(command, input=json.dumps(shapes), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name}/{impl} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def forward_backward_seconds(model, repeats: int, device: str) -> float:
    model.to(device).train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=generator).to(device)
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed combine each, one fwd+bwd")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else 3

    from retainfirst.models import load_model

    model, _ = load_model("smollm2-135m")
    shapes = [list(p.shape) for _, p in model.named_parameters()]
    numel = sum(math.prod(s) for s in shapes)
    fwd_bwd = forward_backward_seconds(model, 1 if args.quick else 2, args.device)
    del model
    print(
        f"SmolLM2-135M gradient set: {len(shapes)} tensors, {numel / 1e6:.1f}M float32 elements "
        f"({numel * 4 / 1e6:.0f} MB per gradient copy); device {args.device}, "
        f"torch threads {torch.get_num_threads()}; fwd+bwd 4x128 tokens: {fwd_bwd:.2f} s"
    )
    header = (
        f"{'strategy':<19} {'ours s':>7} {'naive s':>8} {'time ratio':>10} {'ours/fwd+bwd':>12} "
        f"{'ours extra':>10} {'naive extra':>11} {'mem ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in args.strategies.split(","):
        ours = measure(name, "retainfirst", shapes, repeats, args.device)
        naive = measure(name, "naive", shapes, repeats, args.device)

        def copies(result: dict) -> str:
            low = "<=" if result["extra_bytes"] <= result["floor_bytes"] else ""
            return f"{low}{max(result['extra_bytes'], result['floor_bytes']) / result['grad_bytes']:.2f}"

        memory_ratio = ours["extra_bytes"] / naive["extra_bytes"] if naive["extra_bytes"] else math.nan
        print(
            f"{name:<19} {ours['seconds']:>7.3f} {naive['seconds']:>8.3f} "
            f"{ours['seconds'] / naive['seconds']:>10.2f} {ours['seconds'] / fwd_bwd:>12.3f} "
            f"{copies(ours):>10} {copies(naive):>11} {memory_ratio:>9.3f}",
            flush=True,
        )
    print("extra memory in gradient copies (538 MB); ratios = ours / naive, measured side by side.")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        name, impl, repeats, device = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        torch.set_num_threads(int(sys.argv[6]))
        print(json.dumps(worker(name, impl, json.loads(sys.stdin.read()), repeats, device)))
    else:
        main()
