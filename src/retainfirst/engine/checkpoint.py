"""Atomic checkpoints: a crash at any moment leaves the previous checkpoint intact.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` in one
``os.replace``; the ``latest`` pointer file is replaced the same way afterwards. Contents:

- ``model.safetensors``: the whole model state (full fine-tuning) or the trainable adapter weights (LoRA)
- ``training_state.pt``: step, optimizer, scheduler, data positions, objective and loss-scale state
- ``rng_rank{R}.pt``: Python, NumPy, torch (and CUDA) generator states of each process
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from retainfirst.errors import RetainFirstError

LATEST = "latest"
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names, or None when there is none yet."""
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise RetainFirstError(
            f"{pointer} names {path.name}, which is incomplete; delete {pointer} to restart"
        )
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Model weights


def unique_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop later names of tensors that share storage (tied embeddings): safetensors refuses duplicates."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def model_state(
    model: nn.Module, lora: bool, full_state: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """What a checkpoint stores: adapter weights for LoRA, else the whole state (``full_state`` if given)."""
    if lora:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}
    return full_state if full_state is not None else model.state_dict()


def load_model_state(model: nn.Module, path: Path, lora: bool) -> None:
    """Load what :func:`model_state` saved into the (unwrapped, not yet sharded) model."""
    state = load_file(str(path / MODEL_FILE))
    if lora:
        params = dict(model.named_parameters())
        missing = sorted(name for name, p in params.items() if p.requires_grad and name not in state)
        unknown = sorted(set(state) - set(params))
        if missing or unknown:
            raise RetainFirstError(
                f"{path}: adapter weights do not fit the model (missing {missing[:3]}, "
                f"unknown {unknown[:3]}); "
                "was the run started with other lora settings?"
            )
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        return
    expected = set(unique_tensors(model.state_dict()))
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) & expected)
    if missing or result.unexpected_keys:
        raise RetainFirstError(
            f"{path}: checkpoint does not fit the model (missing {missing[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}); was it written for another model?"
        )


# ----------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Writing and reading


class CheckpointWriter:
    """Writes checkpoints of one run; every rank calls :meth:`save`, with a barrier between phases."""

    def __init__(self, checkpoints: Path, accelerator: Any, keep: int = 0) -> None:
        self.dir = checkpoints
        self.accelerator = accelerator
        self.keep = keep
        if accelerator.is_main_process:  # half-written checkpoints of a killed run
            for partial in checkpoints.glob(".tmp-step-*"):
                shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()

    def save(self, step: int, weights: dict[str, Tensor], training_state: dict[str, Any]) -> Path:
        acc = self.accelerator
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng_rank{acc.process_index}.pt")
        if acc.is_main_process:
            save_file(unique_tensors(weights), str(tmp / MODEL_FILE))
            torch.save(training_state, tmp / STATE_FILE)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():  # a rerun of the same step (resume from an older pointer)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(self.dir / LATEST, final.name + "\n")
            self._prune(step)
        acc.wait_for_everyone()
        return final

    def _prune(self, newest: int) -> None:
        if not self.keep:
            return
        steps = sorted(
            int(p.name.split("-", 1)[1])
            for p in self.dir.glob("step-*")
            if p.is_dir() and p.name.split("-", 1)[1].isdigit()
        )
        for old in steps[: -self.keep]:
            if old != newest:
                shutil.rmtree(self.dir / step_dir_name(old), ignore_errors=True)


def load_training_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def load_rng_state(path: Path, process_index: int) -> None:
    file = path / f"rng_rank{process_index}.pt"
    if not file.is_file():
        raise RetainFirstError(
            f"{path} has no RNG state for process {process_index}; resume with as many processes"
        )
    set_rng_state(torch.load(file, map_location="cpu", weights_only=False))
