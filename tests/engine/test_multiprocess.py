"""Subprocess tests: SIGKILL + resume equals an uninterrupted run; 2-process DDP (gloo) equals 1 process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("engine_worker.py")


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def final_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step}" / "model.safetensors"))


def run_in_process(worker, out: Path, *args: str) -> None:
    """The worker's run in this process, single-threaded like the subprocesses (bitwise comparable)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker.main(["--out", str(out), *args])
    finally:
        torch.set_num_threads(threads)


def run_worker(out: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--out", str(out), *args],
        env=env or worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, worker):
    common = ["--steps", "8", "--checkpoint-every", "2", "--dropout", "0.1", "--synthesizer", "sago"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "--out", str(killed), *common, "--sleep", "0.15"],
        env=worker_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 90
    try:
        # kill after step 3 is logged: step-2 is checkpointed, step 4 (the next checkpoint) is not
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"worker ended early: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    latest = (killed / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step-2", "step-4")
    assert not (killed / "checkpoints" / "step-8").exists()

    run_worker(killed, *common, "--resume")
    uninterrupted = tmp_path / "uninterrupted"
    run_in_process(worker, uninterrupted, *common)

    resumed_weights, reference_weights = final_weights(killed, 8), final_weights(uninterrupted, 8)
    assert resumed_weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    steps = [line for line in metrics.read_text().splitlines() if line]
    assert len(steps) == 8  # lines of steps after the checkpoint were dropped, then rewritten once


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, worker):
    common = ["--steps", "3", "--gas", "2", "--synthesizer", "pcgrad"]
    port = str(free_port())
    ddp_out = tmp_path / "ddp"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--out",
                str(ddp_out),
                *common,
                "--forget-batch-size",
                "2",
                "--retain-batch-size",
                "2",
            ],
            env=worker_env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    single_out = tmp_path / "single"
    run_in_process(worker, single_out, *common, "--forget-batch-size", "4", "--retain-batch-size", "4")

    assert sorted(p.name for p in (ddp_out / "checkpoints" / "step-3").glob("rng_rank*.json")) == [
        "rng_rank0.json",
        "rng_rank1.json",
    ]
    ddp, single = final_weights(ddp_out, 3), final_weights(single_out, 3)
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=2e-6, msg=name)
    ddp_records = [json.loads(line) for line in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    single_records = [json.loads(line) for line in (single_out / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp_records) == len(single_records) == 3
    for a, b in zip(ddp_records, single_records, strict=True):
        for key in ("forget_loss", "retain_loss", "norm_forget", "norm_retain", "cos_forget_retain"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
