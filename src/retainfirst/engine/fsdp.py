"""FSDP2 optimizer shards on disk: every rank saves and restores its own part, without pickle.

Under FSDP2 each rank's optimizer holds the Adam moments of its own parameter shard only, as DTensors.
``optimizer.state_dict()`` on one rank therefore describes a fraction of the state; resuming from it
would silently restart the other ranks' moments. Each rank instead writes its *local* state (the
DTensors' local tensors, step counters, param groups) as ``optimizer_rank{R}.json`` +
``optimizer_rank{R}.safetensors`` with the checkpoint's own tree helpers (engine/checkpoint.py), so
loading never unpickles anything (torch.distributed.checkpoint's ``.metadata`` index is a pickle).
The JSON also records the world size, the rank and every parameter's name and global/local shape;
loading checks them and wraps each sharded tensor back into a DTensor laid out like its parameter.

A resumed run must therefore use the same number of processes (the loop checks that first).
Inside a checkpoint these files are written by :class:`~retainfirst.engine.checkpoint.CheckpointWriter`
into the temporary directory before the manifest, so the manifest vouches for every rank's shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from retainfirst.engine.checkpoint import damaged, optimizer_shard_name, read_tree, write_tree
from retainfirst.engine.grads import shard_as_dtensor
from retainfirst.errors import RetainFirstError

SHARD_FORMAT = "retainfirst-optimizer-shard"


def _raw_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_dtensor(value: Any) -> bool:
    return isinstance(value, Tensor) and hasattr(value, "to_local")


def _local_shape(param: Tensor) -> list[int]:
    return list((param.to_local() if _is_dtensor(param) else param).shape)


def _optimizer_params(raw: Any, model: nn.Module) -> list[tuple[str, Tensor]]:
    """The optimizer's parameters in its state-dict order, with their names in ``model``."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in raw.param_groups for p in group["params"]]
    unnamed = [i for i, p in enumerate(params) if id(p) not in names]
    if unnamed:
        raise ValueError(f"optimizer parameters {unnamed[:3]} are not parameters of the model")
    return [(names[id(p)], p) for p in params]


def sharded_optimizer_state(optimizer: Any, model: nn.Module) -> dict[str, Any]:
    """This rank's optimizer state as a tree for ``write_tree`` (DTensors become their local shards)."""
    raw = _raw_optimizer(optimizer)
    rank, world = _rank_and_world()
    params = _optimizer_params(raw, model)
    state = raw.state_dict()
    sharded = {  # which state entries were DTensors, to rebuild them as such
        index: sorted(key for key, value in entries.items() if _is_dtensor(value))
        for index, entries in state["state"].items()
    }
    return {
        "format": SHARD_FORMAT,
        "world_size": world,
        "rank": rank,
        "params": [
            {"name": name, "shape": list(p.shape), "local_shape": _local_shape(p)} for name, p in params
        ],
        "sharded": sharded,
        "optimizer": state,  # split_tensors stores DTensors as their local tensors
    }


def load_sharded_optimizer_state(optimizer: Any, model: nn.Module, tree: Any, source: Path) -> None:
    """Restore what :func:`sharded_optimizer_state` returned (on this rank) into ``optimizer``."""
    raw = _raw_optimizer(optimizer)
    rank, world = _rank_and_world()
    name = f"{optimizer_shard_name(rank)}.json"
    if not isinstance(tree, dict) or tree.get("format") != SHARD_FORMAT:
        raise damaged(source, f"{name}: not a retainfirst optimizer shard")
    if tree.get("world_size") != world or tree.get("rank") != rank:
        raise RetainFirstError(
            f"cannot resume from {source}: its optimizer shards were written by "
            f"{tree.get('world_size')} process(es), now there are {world}; resume with as many processes"
        )
    params = _optimizer_params(raw, model)
    expected = [{"name": name, "shape": list(p.shape), "local_shape": _local_shape(p)} for name, p in params]
    if tree.get("params") != expected:
        raise RetainFirstError(
            f"{source / name} does not fit this run (its parameter names or shapes differ); "
            "was it written for another model or trainable set?"
        )
    try:
        state = tree["optimizer"]
        for index, keys in tree["sharded"].items():
            param = params[index][1]
            for key in keys:
                local = state["state"][index][key].to(param.device)
                state["state"][index][key] = shard_as_dtensor(local, param)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise damaged(source, f"{name}: malformed ({type(exc).__name__}: {str(exc)[:120]})") from None
    raw.load_state_dict(state)


def save_sharded_optimizer(directory: str | Path, optimizer: Any, model: nn.Module) -> None:
    """Write this rank's optimizer shard into ``directory`` (created) as ``optimizer_rank{R}.*``.

    Every rank calls it; it is not a collective. Inside a checkpoint, the checkpoint writer does this
    (and the manifest) itself.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rank, _ = _rank_and_world()
    write_tree(directory, optimizer_shard_name(rank), sharded_optimizer_state(optimizer, model))


def load_sharded_optimizer(directory: str | Path, optimizer: Any, model: nn.Module) -> None:
    """Restore into ``optimizer`` the shard this rank saved with :func:`save_sharded_optimizer`."""
    directory = Path(directory)
    rank, _ = _rank_and_world()
    name = optimizer_shard_name(rank)
    if not all((directory / f"{name}{ext}").is_file() for ext in (".json", ".safetensors")):
        raise RetainFirstError(
            f"{directory} holds no sharded optimizer state for process {rank} ({name}.json/.safetensors); "
            "was it written by an FSDP run with as many processes?"
        )
    load_sharded_optimizer_state(optimizer, model, read_tree(directory, name), directory)


def load_full_model_state(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Load a full (gathered) model state into an FSDP2-sharded model: each rank keeps its own shard.

    Every rank holds the same full tensors (read from the verified checkpoint), so each slices its
    shard locally (``distribute_tensor`` without a source rank: no communication).
    """
    from torch.distributed.tensor import distribute_tensor

    local = model.state_dict()
    seen: set[int] = set()
    tied = set()  # later names of shared tensors: the checkpoint stores one of them (unique_tensors)
    for key, target in local.items():
        pointer = (target.to_local() if _is_dtensor(target) else target).data_ptr()
        if pointer in seen and key not in state:
            tied.add(key)
        seen.add(pointer)
    missing = sorted(set(local) - set(state) - tied)
    unexpected = sorted(set(state) - set(local))
    if missing or unexpected:
        raise RetainFirstError(
            f"{source}: checkpoint does not fit the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it written for another model?"
        )
    with torch.no_grad():
        for key, target in local.items():
            if key in tied:
                continue
            full = state[key]
            if tuple(full.shape) != tuple(target.shape):
                raise RetainFirstError(
                    f"{source}: {key} has shape {tuple(full.shape)} in the checkpoint, the model has "
                    f"{tuple(target.shape)}; was it written for another model?"
                )
            if _is_dtensor(target):
                shard = distribute_tensor(
                    full.to(target.to_local().device),
                    target.device_mesh,
                    target.placements,
                    src_data_rank=None,
                )
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(full)
