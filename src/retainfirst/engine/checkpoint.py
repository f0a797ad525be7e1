"""Atomic, pickle-free, verified checkpoints.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``checkpoints/step-N`` in
one ``os.replace``; the ``latest`` pointer file is replaced atomically afterwards. Nothing is
pickled, so a run directory from someone else cannot execute code on ``--resume``: tensors go to
safetensors, everything else to JSON. Contents of ``step-N/``:

- ``model.safetensors``: the whole model state (full fine-tuning) or the trainable adapter weights (LoRA)
- ``training_state.json`` + ``training_state.safetensors``: step, optimizer (moments as tensors
  ``optimizer.state.<i>.<name>``, param groups in JSON), scheduler, loss scale, stream positions,
  objective states, process count and the train config
- ``rng_rank{R}.json`` + ``rng_rank{R}.safetensors``: Python, NumPy, torch and CUDA generator
  states of process R
- FSDP runs only: ``optimizer_rank{R}.json`` + ``optimizer_rank{R}.safetensors``: process R's own
  optimizer shard (engine/fsdp.py); ``training_state`` then holds no optimizer (``null``)
- ``manifest.json`` (written last): format version, and SHA-256 and size of every other file.
  Resuming verifies it before reading anything else, so a damaged file fails loudly instead of
  resuming with wrong weights.

JSON trees are stored with tensors replaced by ``{"__tensor__": key}`` (the key in the sibling
safetensors file), tuples as ``{"__tuple__": [...]}`` and dicts with integer keys (optimizer
state) as ``{"__int_dict__": [[k, v], ...]}``, so they load back exactly as they were saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from retainfirst.errors import RetainFirstError
from retainfirst.io import atomic_write_text

FORMAT = "retainfirst-checkpoint"
FORMAT_VERSION = 2
LATEST = "latest"
MODEL_FILE = "model.safetensors"
STATE_NAME = "training_state"  # .json + .safetensors
MANIFEST_FILE = "manifest.json"
STEP_DIR = re.compile(r"step-(\d+)")
SHA256 = re.compile(r"[0-9a-f]{64}")
_RESERVED = ("__tensor__", "__tuple__", "__int_dict__")


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def rng_name(process_index: int) -> str:
    return f"rng_rank{process_index}"  # .json + .safetensors


def optimizer_shard_name(process_index: int) -> str:
    return f"optimizer_rank{process_index}"  # .json + .safetensors (FSDP runs)


# State entries that every process writes for itself (the rest is written by the main process).
PER_PROCESS = {"rng": rng_name, "optimizer_shard": optimizer_shard_name}


# ----------------------------------------------------------------------------------------------
# The latest pointer


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names, or None when there is none yet.

    The pointer must be one line ``step-N`` naming a directory directly inside ``checkpoints``;
    anything else (an absolute path, ``..``, binary junk) is refused rather than followed.
    """
    pointer = checkpoints / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None
    fix = f"write 'step-N' (an existing checkpoint in {checkpoints}) into it or delete it to start over"
    try:
        text = pointer.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise RetainFirstError(
            f"{pointer} is not a readable text file ({type(exc).__name__}); {fix}"
        ) from None
    name = text[:-1] if text.endswith("\n") else text
    if not STEP_DIR.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise RetainFirstError(f"{pointer} must hold one line 'step-N', got {shown!r}; {fix}")
    path = checkpoints / name
    if path.is_symlink() or not path.is_dir():
        raise RetainFirstError(f"{pointer} names {name}, which is not a checkpoint directory; {fix}")
    return path


def write_latest(checkpoints: Path, name: str) -> None:
    atomic_write_text(checkpoints / LATEST, name + "\n")


def previous_checkpoint(path: Path) -> str | None:
    """The newest ``step-M`` next to ``path`` with M smaller than its step (holding a manifest)."""
    match = STEP_DIR.fullmatch(path.name)
    limit = int(match.group(1)) if match else None
    steps = []
    for sibling in path.parent.glob("step-*"):
        found = STEP_DIR.fullmatch(sibling.name)
        usable = found and sibling.is_dir() and (sibling / MANIFEST_FILE).is_file()
        if usable and (limit is None or int(found.group(1)) < limit):
            steps.append(int(found.group(1)))
    return step_dir_name(max(steps)) if steps else None


def damaged(path: Path, detail: str) -> RetainFirstError:
    """One-line error for a damaged checkpoint, naming the file and the way out."""
    previous = previous_checkpoint(path)
    if previous is not None:
        advice = f"delete it and point {path.parent / LATEST} at {previous}, or start over with --overwrite"
    else:
        advice = "no earlier checkpoint exists: start over with --overwrite (or a new out_dir)"
    return RetainFirstError(f"{path} is damaged ({detail}); {advice}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= 120 else text[:120] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------
# Manifest


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Hash every file in ``directory``; call after all of them are written."""
    files = {
        p.name: {"sha256": file_digest(p), "bytes": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def verify_checkpoint(path: Path, required: list[str]) -> list[str]:
    """Check ``path`` against its manifest (presence, size, SHA-256 of every listed file); its file names."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise damaged(path, f"{MANIFEST_FILE}: missing; it was not written by this retainfirst version")
    manifest = read_json(manifest_path, path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise damaged(path, f"{MANIFEST_FILE}: not a retainfirst checkpoint manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise damaged(
            path, f"{MANIFEST_FILE}: format version {manifest.get('version')!r}, expected {FORMAT_VERSION}"
        )
    for name in required:
        if name not in files:
            raise damaged(path, f"{name}: not listed in {MANIFEST_FILE}")
    for name, entry in files.items():
        if "/" in name or "\\" in name or name in ("", ".", "..") or not isinstance(entry, dict):
            raise damaged(path, f"{MANIFEST_FILE}: invalid entry {name[:40]!r}")
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise damaged(path, f"{name}: missing")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise damaged(path, f"{name}: {size} bytes, the manifest says {entry.get('bytes')}")
        expected = entry.get("sha256")
        if not isinstance(expected, str) or not SHA256.fullmatch(expected) or file_digest(file) != expected:
            raise damaged(path, f"{name}: SHA-256 mismatch")
    return list(files)


# ----------------------------------------------------------------------------------------------
# JSON + safetensors trees


def split_tensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """``tree`` as JSON-able data with each tensor replaced by a reference, and the tensors by key."""
    tensors: dict[str, Tensor] = {}

    def encode(value: Any, key: str) -> Any:
        if isinstance(value, Tensor):
            if hasattr(value, "to_local"):  # a DTensor (FSDP2): this rank's shard
                value = value.to_local()
            tensors[key] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                if any(k in _RESERVED for k in value):
                    raise TypeError(f"{key}: dict keys {_RESERVED} are reserved")
                return {k: encode(v, f"{key}.{k}" if key else k) for k, v in value.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
                return {"__int_dict__": [[k, encode(v, f"{key}.{k}")] for k, v in value.items()]}
            raise TypeError(
                f"{key}: cannot store a dict with keys of types {sorted({type(k).__name__ for k in value})}"
            )
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, np.integer | np.floating | np.bool_):
            return value.item()
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"{key}: cannot store a {type(value).__name__} in a checkpoint")

    return encode(tree, prefix), tensors


def join_tensors(tree: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`split_tensors` (raises KeyError/TypeError/ValueError on malformed data)."""
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(join_tensors(v, tensors) for v in tree["__tuple__"])
        if "__int_dict__" in tree:
            return {int(k): join_tensors(v, tensors) for k, v in tree["__int_dict__"]}
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    return tree


def write_tree(directory: Path, name: str, tree: Any) -> None:
    """``name.json`` + ``name.safetensors`` in ``directory`` (inside a temporary checkpoint dir)."""
    data, tensors = split_tensors(tree)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(data, allow_nan=True) + "\n", encoding="utf-8")


def read_json(file: Path, checkpoint: Path) -> Any:
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise damaged(checkpoint, f"{file.name}: {_reason(exc)}") from None


def read_tensors(file: Path, checkpoint: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for every kind of bad header
        raise damaged(checkpoint, f"{file.name}: {_reason(exc)}") from None


def read_tree(checkpoint: Path, name: str) -> Any:
    data = read_json(checkpoint / f"{name}.json", checkpoint)
    tensors = read_tensors(checkpoint / f"{name}.safetensors", checkpoint)
    try:
        return join_tensors(data, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise damaged(checkpoint, f"{name}.json: malformed ({_reason(exc)})") from None


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


def load_model_state(model: nn.Module, state: dict[str, Tensor], lora: bool, path: Path) -> None:
    """Load what :func:`model_state` saved into the (unwrapped) model."""
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
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise RetainFirstError(f"{path / MODEL_FILE} does not fit the model ({_reason(exc)})") from None
    missing = sorted(set(result.missing_keys) & expected)
    if missing or result.unexpected_keys:
        raise RetainFirstError(
            f"{path}: checkpoint does not fit the model (missing {missing[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}); was it written for another model?"
        )


# ----------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    """This process's generator states, as JSON-able data and byte tensors."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Writing and reading whole checkpoints


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

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state``: ``model`` (weights), :data:`PER_PROCESS` entries (this rank's), the rest.

        Every rank writes its own files into the temporary directory; the manifest is written after
        a barrier, so it covers all of them, and only then is the directory renamed into place.
        """
        acc = self.accelerator
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        for key, name in PER_PROCESS.items():
            if state.get(key) is not None:
                write_tree(tmp, name(acc.process_index), state[key])
        if acc.is_main_process:
            save_file(unique_tensors(state["model"]), str(tmp / MODEL_FILE))
            shared = {k: v for k, v in state.items() if k != "model" and k not in PER_PROCESS}
            write_tree(tmp, STATE_NAME, shared)
        acc.wait_for_everyone()  # every rank's files are complete before the manifest hashes them
        if acc.is_main_process:
            write_manifest(tmp)  # last: it vouches for every file above
            if final.exists():  # a rerun of the same step (resume from an older pointer)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_latest(self.dir, final.name)
            self._prune(step)
        acc.wait_for_everyone()
        return final

    def _prune(self, newest: int) -> None:
        if not self.keep:
            return
        steps = sorted(
            int(match.group(1))
            for p in self.dir.glob("step-*")
            if p.is_dir() and (match := STEP_DIR.fullmatch(p.name))
        )
        for old in steps[: -self.keep]:
            if old != newest:
                shutil.rmtree(self.dir / step_dir_name(old), ignore_errors=True)


def read_checkpoint(path: Path, process_index: int) -> dict[str, Any]:
    """Verify ``path`` against its manifest, then read it in the shape :meth:`CheckpointWriter.save` took.

    ``optimizer_shard`` is this process's optimizer shard when the checkpoint has one (FSDP runs).
    """
    rng = rng_name(process_index)
    required = [MODEL_FILE, f"{STATE_NAME}.json", f"{STATE_NAME}.safetensors"]
    listed = verify_checkpoint(path, required)
    if f"{rng}.json" not in listed or f"{rng}.safetensors" not in listed:
        raise RetainFirstError(
            f"{path} has no RNG state for process {process_index}; resume with as many processes"
        )
    state = read_tree(path, STATE_NAME)
    if not isinstance(state, dict):
        raise damaged(path, f"{STATE_NAME}.json: not a JSON object")
    state["model"] = read_tensors(path / MODEL_FILE, path)
    state["rng"] = read_tree(path, rng)
    shard = optimizer_shard_name(process_index)
    if f"{shard}.json" in listed or f"{shard}.safetensors" in listed:
        state["optimizer_shard"] = read_tree(path, shard)
    return state
