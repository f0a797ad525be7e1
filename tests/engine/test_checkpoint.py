"""Checkpoints: no pickle anywhere, a strict ``latest`` pointer, a manifest that catches damaged files."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from retainfirst.engine import TrainConfig, unlearn
from retainfirst.engine.checkpoint import (
    MANIFEST_FILE,
    file_digest,
    join_tensors,
    latest_checkpoint,
    rng_state,
    set_rng_state,
    split_tensors,
    write_manifest,
)
from retainfirst.errors import RetainFirstError

LOADED_FILES = [
    "model.safetensors",
    "training_state.json",
    "training_state.safetensors",
    "rng_rank0.json",
    "rng_rank0.safetensors",
    "manifest.json",
]


def config(**overrides) -> TrainConfig:
    base = {
        "steps": 2,
        "lr": 1e-3,
        "forget_batch_size": 2,
        "retain_batch_size": 2,
        "synthesizer": "pcgrad",
        "checkpoint_every": 1,
        "disable_progress": True,
        "save_final_model": False,
    }
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory, worker):
    """A finished 2-step run with checkpoints step-1 and step-2 (copied by each test)."""
    out = tmp_path_factory.mktemp("pristine") / "run"
    model, tokenizer, forget, retain = worker.tiny_setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unlearn(model, tokenizer, forget, retain, config(), out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def run(pristine_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine_run, copy)
    return copy


def resume(worker, out: Path, **overrides):
    model, tokenizer, forget, retain = worker.tiny_setup()
    return unlearn(model, tokenizer, forget, retain, config(**overrides), out, resume=True)


class Payload:
    """Unpickling this writes a marker file: proof that a loader executed attacker code."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def malicious_pickles(marker: Path) -> list[bytes]:
    payload = Payload()
    payload.marker = str(marker)
    plain = pickle.dumps(payload)
    zipped = marker.with_name("payload.pt")
    torch.save(payload, zipped)  # the torch.save (zip) flavour of the same payload
    return [plain, zipped.read_bytes()]


# ----------------------------------------------------------------------------------------------
# No pickle


def test_checkpoint_files_hold_no_pickle(run):
    step = run / "checkpoints" / "step-2"
    assert sorted(p.name for p in step.iterdir()) == sorted(LOADED_FILES)
    state = json.loads((step / "training_state.json").read_text())
    assert state["step"] == 2 and state["forget_position"] == 4 and state["num_processes"] == 1
    tensors = load_file(str(step / "training_state.safetensors"))
    assert "optimizer.state.0.exp_avg" in tensors and "optimizer.state.0.exp_avg_sq" in tensors
    assert tensors["optimizer.state.0.exp_avg"].dtype == torch.float32
    assert set(load_file(str(step / "rng_rank0.safetensors"))) == {"torch"}


def test_planted_old_pickle_files_are_ignored(run, worker, tmp_path):
    marker = tmp_path / "marker"
    blobs = malicious_pickles(marker)
    pickle.loads(blobs[0])  # the payload is live: unpickling it does write the marker
    assert marker.read_text() == "pwned"
    marker.unlink()
    step = run / "checkpoints" / "step-2"
    for name, blob in zip(("training_state.pt", "rng_rank0.pt"), blobs, strict=True):
        (step / name).write_bytes(blob)
    result = resume(worker, run)
    assert result.steps_done == 2
    assert not marker.exists()


@pytest.mark.parametrize("name", LOADED_FILES)
@pytest.mark.parametrize("refresh_manifest", [False, True])
def test_pickle_in_place_of_a_loaded_file_is_refused(run, worker, tmp_path, name, refresh_manifest):
    marker = tmp_path / "marker"
    step = run / "checkpoints" / "step-2"
    for blob in malicious_pickles(marker):
        (step / name).write_bytes(blob)
        if refresh_manifest and name != MANIFEST_FILE:
            write_manifest(step)  # an attacker can make the manifest match; parsing must still refuse
        with pytest.raises(RetainFirstError, match=f"step-2 is damaged \\({name}: "):
            resume(worker, run)
        assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# The latest pointer


@pytest.mark.parametrize(
    "content",
    [
        b"/etc",
        b"..",
        b"../..",
        b"step-2/../..",
        b"step-2/../step-1",
        b"\xff\xfe\x00bin",
        b"",
        b"\n",
        b"step-2\nstep-1\n",
        b"step-x",
        b" step-2",
        str(Path("/tmp/step-2")).encode(),
    ],
)
def test_latest_must_be_one_step_line(run, content):
    pointer = run / "checkpoints" / "latest"
    pointer.write_bytes(content)
    with pytest.raises(RetainFirstError, match=f"^{pointer} (must hold one line 'step-N'|is not a readable)"):
        latest_checkpoint(run / "checkpoints")


def test_latest_naming_a_missing_or_linked_directory_is_refused(run, tmp_path):
    checkpoints = run / "checkpoints"
    (checkpoints / "latest").write_text("step-7\n")
    with pytest.raises(RetainFirstError, match="names step-7, which is not a checkpoint directory"):
        latest_checkpoint(checkpoints)
    outside = tmp_path / "elsewhere"
    shutil.copytree(checkpoints / "step-2", outside)
    os.symlink(outside, checkpoints / "step-9")
    (checkpoints / "latest").write_text("step-9")
    with pytest.raises(RetainFirstError, match="names step-9, which is not a checkpoint directory"):
        latest_checkpoint(checkpoints)


def test_bad_latest_fails_resume_and_a_fresh_start(run, worker):
    (run / "checkpoints" / "latest").write_text("../../somewhere\n")
    with pytest.raises(RetainFirstError, match="latest must hold one line 'step-N'"):
        resume(worker, run)
    model, tokenizer, forget, retain = worker.tiny_setup()
    with pytest.raises(RetainFirstError, match="latest must hold one line 'step-N'"):
        unlearn(model, tokenizer, forget, retain, config(), run)


# ----------------------------------------------------------------------------------------------
# Manifest


def test_manifest_covers_every_other_file(run):
    for step in ("step-1", "step-2"):
        directory = run / "checkpoints" / step
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        assert manifest["format"] == "retainfirst-checkpoint" and manifest["version"] == 2
        others = {p.name for p in directory.iterdir()} - {MANIFEST_FILE}
        assert set(manifest["files"]) == others
        for name, entry in manifest["files"].items():
            assert entry == {
                "sha256": file_digest(directory / name),
                "bytes": (directory / name).stat().st_size,
            }


def zero_4kb(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (zero_4kb, "model.safetensors: SHA-256 mismatch"),
        (random_bytes, "model.safetensors: SHA-256 mismatch"),
        (truncate, r"model.safetensors: \d+ bytes, the manifest says \d+"),
    ],
)
def test_damaged_model_file_is_a_clear_error_naming_the_previous_checkpoint(run, worker, damage, detail):
    model_file = run / "checkpoints" / "step-2" / "model.safetensors"
    before = model_file.read_bytes()
    damage(model_file)
    assert model_file.read_bytes() != before
    step = run / "checkpoints" / "step-2"
    expected = (
        f"^{step} is damaged \\({detail}\\); delete it and point {run / 'checkpoints' / 'latest'} at step-1, "
        "or start over with --overwrite$"
    )
    with pytest.raises(RetainFirstError, match=expected):
        resume(worker, run)


def test_missing_manifest_or_file_is_an_error(run, worker):
    (run / "checkpoints" / "step-2" / "rng_rank0.json").unlink()
    with pytest.raises(RetainFirstError, match=r"step-2 is damaged \(rng_rank0.json: missing\)"):
        resume(worker, run)
    (run / "checkpoints" / "step-2" / MANIFEST_FILE).unlink()
    with pytest.raises(RetainFirstError, match=r"step-2 is damaged \(manifest.json: missing"):
        resume(worker, run)


def test_damage_without_an_earlier_checkpoint_says_start_over(run, worker):
    shutil.rmtree(run / "checkpoints" / "step-1")
    zero_4kb(run / "checkpoints" / "step-2" / "model.safetensors")
    with pytest.raises(RetainFirstError, match="no earlier checkpoint exists: start over with --overwrite"):
        resume(worker, run)


def test_malformed_json_with_a_matching_manifest_names_the_file(run, worker):
    step = run / "checkpoints" / "step-2"
    (step / "training_state.json").write_text('{"step": 2, "optimizer": ')
    write_manifest(step)
    with pytest.raises(RetainFirstError, match=r"step-2 is damaged \(training_state.json: JSONDecodeError"):
        resume(worker, run)
    (step / "training_state.json").write_bytes(b"\xff\xfe{}")
    write_manifest(step)
    with pytest.raises(
        RetainFirstError, match=r"step-2 is damaged \(training_state.json: UnicodeDecodeError"
    ):
        resume(worker, run)
    (step / "training_state.json").write_text('{"step": {"__tensor__": "nope"}}')
    write_manifest(step)
    with pytest.raises(RetainFirstError, match=r"training_state.json: malformed"):
        resume(worker, run)


def test_resume_from_an_older_pointer_rewrites_the_same_weights(run, worker):
    """Pointing latest back at step-1 and resuming reproduces step-2 bit for bit."""
    original = load_file(str(run / "checkpoints" / "step-2" / "model.safetensors"))
    shutil.rmtree(run / "checkpoints" / "step-2")
    (run / "checkpoints" / "latest").write_text("step-1\n")
    result = resume(worker, run)
    assert result.steps_done == 2
    again = load_file(str(run / "checkpoints" / "step-2" / "model.safetensors"))
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


# ----------------------------------------------------------------------------------------------
# Trees and RNG


def test_tree_round_trip_keeps_types_exactly():
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 5: {}},
        "groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0, 5], "name": None}],
        "bf16": torch.randn(4).to(torch.bfloat16),
        "flags": [True, 2, 0.1, "x"],
    }
    data, tensors = split_tensors(tree)
    assert set(tensors) == {"state.0.step", "state.0.exp_avg", "bf16"}
    back = join_tensors(json.loads(json.dumps(data)), tensors)
    assert back["groups"] == tree["groups"] and isinstance(back["groups"][0]["betas"], tuple)
    assert list(back["state"]) == [0, 5] and back["state"][5] == {}
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], tree["bf16"])
    with pytest.raises(TypeError, match="cannot store a object"):
        split_tensors({"x": object()})


def test_rng_state_round_trip_through_json_and_safetensors(tmp_path):
    from retainfirst.engine.checkpoint import read_tree, write_tree

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    write_tree(tmp_path, "rng", rng_state())
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(read_tree(tmp_path, "rng"))
    assert random.random() == expected[0]
    assert np.random.standard_normal(3).tolist() == expected[1]
    assert torch.equal(torch.rand(3), expected[2])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("config"), r"training_state.json holds no valid train config \(KeyError"),
        (
            lambda s: s.update(forget_position="abc"),
            r"training_state.json does not fit this run \(ValueError",
        ),
        (
            lambda s: s["optimizer"].pop("param_groups"),
            r"training_state.json does not fit this run \(KeyError",
        ),
    ],
)
def test_training_state_that_does_not_fit_is_one_error_line(run, worker, edit, message):
    step = run / "checkpoints" / "step-2"
    state = json.loads((step / "training_state.json").read_text())
    edit(state)
    (step / "training_state.json").write_text(json.dumps(state))
    write_manifest(step)
    with pytest.raises(RetainFirstError, match=message) as error:
        resume(worker, run)
    assert "\n" not in str(error.value)


def test_cuda_rng_states_round_trip(tmp_path, monkeypatch):
    """The CUDA branch (no GPU here): per-device byte tensors go to safetensors and come back."""
    from retainfirst.engine.checkpoint import read_tree, write_tree

    devices = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    write_tree(tmp_path, "rng", rng_state())
    assert set(load_file(str(tmp_path / "rng.safetensors"))) == {"torch", "cuda.0", "cuda.1"}
    set_rng_state(read_tree(tmp_path, "rng"))
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, devices, strict=True))
