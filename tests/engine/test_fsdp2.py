"""FSDP2 on CPU (gloo): 2 sharded processes == 1 process, and optimizer shards survive SIGKILL.

The model is float64 with weights whose first dimension (257 vocab rows, 97 MLP rows) does not divide
by the 2 ranks, so FSDP2's shards are uneven: the path where a DTensor rebuilt from a local shard
needs the global shape (``grads.write_update``).

Tolerances. Gradients, the synthesized update, clipping and AdamW are float64, so ``sum`` and ``sago``
(elementwise rules) give weights equal to ~1e-15 relative (only the order of the gradient sums
differs). ``pcgrad_global`` scales the forget gradient by a projection coefficient computed from
dot products that the synthesizers accumulate and all-reduce in float32 (synthesis/base.py, by
design, for every dtype), so its weights agree to ~1e-8 relative. Logged losses go through float32
in the loop and the logged stats through the same float32 sums: they agree to ~1e-7 relative.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retainfirst.errors import RetainFirstError

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).with_name("fsdp_worker.py")
SYNTHESIZERS = ("sum", "pcgrad_global", "sago")
STEPS = 3
# (rtol, atol) of the final weights; see the module docstring for why pcgrad_global's is looser.
WEIGHT_TOLERANCE = {"sum": (1e-12, 1e-15), "sago": (1e-12, 1e-15), "pcgrad_global": (1e-6, 1e-9)}
SHARD_FILES = [f"optimizer_rank{r}.{ext}" for r in (0, 1) for ext in ("json", "safetensors")]
STAT_KEYS = ("forget_loss", "retain_loss", "norm_forget", "norm_retain", "norm_update", "cos_forget_retain")
STAT_KEYS += ("cos_step_retain", "cos_step_forget", "norm_step")  # reduced over the shards

PROBE = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    layer = torch.nn.Linear(4, 7, dtype=torch.float64)
    fully_shard(layer, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    layer(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    assert layer.weight.grad.full_tensor().shape == (7, 4)
    dist.destroy_process_group()
    """
)


def load_worker():
    spec = importlib.util.spec_from_file_location("retainfirst_fsdp_test_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``world`` processes of ``args`` (a python command line) on one gloo process group."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str]]:
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(scope="module")
def fsdp2_on_gloo() -> None:
    """Skip, showing torch's error, when this torch cannot run FSDP2 on a CPU (gloo) process group."""
    results = wait_all(launch(["-c", PROBE]), timeout=120)
    for code, err in results:
        if code != 0:
            lines = [line for line in err.strip().splitlines() if line.strip()]
            pytest.skip(
                f"FSDP2 (fully_shard) does not run on CPU/gloo with torch {torch.__version__}: "
                f"{lines[-1] if lines else f'exit code {code}'}"
            )


@pytest.fixture(scope="module")
def runs(fsdp2_on_gloo, tmp_path_factory) -> dict[str, Path]:
    """One 2-process FSDP2 launch (every synthesizer) and the 1-process runs with the same global batch."""
    root = tmp_path_factory.mktemp("fsdp2")
    common = ["--steps", str(STEPS), "--synthesizers", ",".join(SYNTHESIZERS)]
    procs = launch(
        [
            str(WORKER),
            "--out",
            str(root / "fsdp"),
            "--fsdp",
            *common,
            "--forget-batch-size",
            "2",
            "--retain-batch-size",
            "2",
        ]
    )
    for code, err in wait_all(procs):
        assert code == 0, err[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_worker().main(
            ["--out", str(root / "single"), *common, "--forget-batch-size", "4", "--retain-batch-size", "4"]
        )
    finally:
        torch.set_num_threads(threads)
    return {"fsdp": root / "fsdp", "single": root / "single"}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{STEPS}" / "model.safetensors"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("synthesizer", SYNTHESIZERS)
def test_two_process_fsdp2_matches_one_process_step_for_step(runs, synthesizer):
    sharded, single = final_weights(runs["fsdp"] / synthesizer), final_weights(runs["single"] / synthesizer)
    assert sharded.keys() == single.keys()
    assert sharded["lm_head.weight"].shape == (257, 32) and sharded["lm_head.weight"].dtype == torch.float64
    rtol, atol = WEIGHT_TOLERANCE[synthesizer]
    initial = load_worker().tiny_setup()[0].state_dict()
    assert not torch.equal(single["lm_head.weight"], initial["lm_head.weight"])  # it trained
    for name, tensor in single.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=rtol, atol=atol, msg=name)
    sharded_records, single_records = (
        records(runs["fsdp"] / synthesizer),
        records(runs["single"] / synthesizer),
    )
    assert [r["step"] for r in sharded_records] == [r["step"] for r in single_records] == [1, 2, 3]
    for a, b in zip(sharded_records, single_records, strict=True):
        for key in STAT_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-12), (a["step"], key)
        if synthesizer == "pcgrad_global":
            assert a["projection_coefficient"] == pytest.approx(b["projection_coefficient"], rel=1e-5)


def test_sharded_optimizer_state_survives_sigkill(fsdp2_on_gloo, tmp_path):
    """Every rank saves its optimizer shard, both ranks are SIGKILLed, fresh ranks load it bitwise."""
    procs = launch([str(WORKER), "--out", str(tmp_path), "--mode", "save"])
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and not all((tmp_path / f"rank{r}.done").exists() for r in (0, 1)):
            assert all(proc.poll() is None for proc in procs), procs[0].communicate()[1][-3000:]
            time.sleep(0.05)
        assert all((tmp_path / f"rank{r}.done").exists() for r in (0, 1)), "save phase timed out"
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert sorted(p.name for p in (tmp_path / "optimizer").iterdir()) == SHARD_FILES

    for code, err in wait_all(launch([str(WORKER), "--out", str(tmp_path), "--mode", "load"])):
        assert code == 0, err[-3000:]
    # 21 parameters x (exp_avg, exp_avg_sq, step), each compared bitwise on its own rank
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.verified").read_text() == "63 optimizer tensors\n"


def test_fsdp2_run_killed_between_checkpoints_resumes_to_the_uninterrupted_result(runs, tmp_path):
    """SIGKILL both ranks after a checkpoint, resume on 2 fresh ranks: same weights as one process."""
    common = ["--out", str(tmp_path), "--fsdp", "--synthesizers", "sum", "--steps", str(STEPS)]
    common += ["--checkpoint-every", "1", "--forget-batch-size", "2", "--retain-batch-size", "2"]
    procs = launch([str(WORKER), *common, "--sleep", "0.3"])
    metrics = tmp_path / "sum" / "metrics.jsonl"
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and all(proc.poll() is None for proc in procs):
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        assert all(proc.poll() is None for proc in procs), "the run ended before it could be killed"
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    latest = (tmp_path / "sum" / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step-1", "step-2"), latest
    manifest = json.loads((tmp_path / "sum" / "checkpoints" / latest / "manifest.json").read_text())
    assert set(SHARD_FILES) <= set(manifest["files"])  # every rank's shard, written before the manifest

    results = wait_all(launch([str(WORKER), *common, "--resume"]))
    for code, err in results:
        assert code == 0, err[-3000:]
    resumed, single = final_weights(tmp_path / "sum"), final_weights(runs["single"] / "sum")
    for name, tensor in single.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-12, atol=1e-15, msg=name)
    assert [r["step"] for r in records(tmp_path / "sum")] == [1, 2, 3]


def test_load_sharded_optimizer_names_a_directory_without_shards(tmp_path):
    from retainfirst.engine.fsdp import load_sharded_optimizer

    with pytest.raises(RetainFirstError, match="no sharded optimizer state"):
        load_sharded_optimizer(tmp_path, optimizer=None, model=torch.nn.Linear(2, 2))


# ---- a pickle planted as an optimizer shard is refused, never executed ---------------------------


class Payload:
    """Unpickling this writes a marker file: proof that a loader executed attacker code."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def malicious_pickles(marker: Path) -> list[bytes]:
    payload = Payload()
    payload.marker = str(marker)
    zipped = marker.with_name("payload.pt")
    torch.save(payload, zipped)  # the torch.save (zip) flavour of the same payload
    blobs = [pickle.dumps(payload), zipped.read_bytes()]
    pickle.loads(blobs[0])  # the payload is live: unpickling it does write the marker
    assert marker.read_text() == "pwned"
    marker.unlink()
    return blobs


@pytest.mark.parametrize("name", SHARD_FILES)
@pytest.mark.parametrize("refresh_manifest", [False, True])
def test_pickle_planted_as_an_optimizer_shard_is_refused(runs, tmp_path, name, refresh_manifest):
    """The manifest refuses a swapped shard file; with a matching manifest the format check does."""
    from retainfirst.engine.checkpoint import read_checkpoint, write_manifest
    from retainfirst.engine.fsdp import load_sharded_optimizer

    marker = tmp_path / "marker"
    step = tmp_path / f"step-{STEPS}"
    shutil.copytree(runs["fsdp"] / "sum" / "checkpoints" / f"step-{STEPS}", step)
    assert set(SHARD_FILES) <= {p.name for p in step.iterdir()}
    rank = int(name.split(".")[0].removeprefix("optimizer_rank"))
    for blob in malicious_pickles(marker):
        (step / name).write_bytes(blob)
        if refresh_manifest:
            write_manifest(step)  # an attacker can make the manifest match; parsing must still refuse
        with pytest.raises(RetainFirstError, match=f"step-{STEPS} is damaged \\({name}: "):
            read_checkpoint(step, rank)
        if rank == 0:  # the direct loader (no manifest) refuses too; it reads before touching the model
            with pytest.raises(RetainFirstError, match=f"is damaged \\({name}: "):
                load_sharded_optimizer(step, optimizer=None, model=torch.nn.Linear(2, 2))
        assert not marker.exists()


def test_fsdp2_resume_with_a_planted_shard_pickle_stops_every_rank(runs, tmp_path):
    """Rank 1's shard is a pickle with a matching manifest: rank 1 refuses it, rank 0 stops too."""
    from retainfirst.engine.checkpoint import write_manifest

    marker = tmp_path / "marker"
    shutil.copytree(runs["fsdp"] / "sum", tmp_path / "sum")
    step = tmp_path / "sum" / "checkpoints" / f"step-{STEPS}"
    (step / "optimizer_rank1.safetensors").write_bytes(malicious_pickles(marker)[1])
    write_manifest(step)
    common = ["--out", str(tmp_path), "--fsdp", "--synthesizers", "sum", "--steps", str(STEPS)]
    results = wait_all(launch([str(WORKER), *common, "--resume"]))
    assert [code != 0 for code, _ in results] == [True, True]
    assert "process(es) [1] could not read their part" in results[0][1], results[0][1][-2000:]
    assert "is damaged (optimizer_rank1.safetensors: " in results[1][1], results[1][1][-2000:]
    assert not marker.exists()
