"""FSDP2 optimizer shards on disk: every rank saves and restores its own part (torch.distributed.checkpoint).

Under FSDP2 each rank's optimizer holds the Adam moments of its own parameter shard only, as DTensors.
``optimizer.state_dict()`` on rank 0 therefore describes a fraction of the state; resuming from it
would silently restart the other ranks' moments. These functions write and read the sharded state
with DCP, keyed by parameter name, so every rank gets back exactly the shard it wrote.

Both are collectives: call them on every rank, with the model already sharded (after ``prepare``).
The files go into ``directory`` as DCP lays them out (one ``.distcp`` file per rank plus a
``.metadata`` index); write into a checkpoint's temporary directory before its atomic rename, so a
crash mid-write leaves no partial checkpoint. Note that DCP's ``.metadata`` index is a pickle
(torch's ``FileSystemReader`` unpickles it); the tensors and the small non-tensor values in the
``.distcp`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from retainfirst.errors import RetainFirstError

OPTIMIZER_KEY = "optimizer"
SHARDED_OPTIMIZER_DIR = "optimizer_shards"
"""Where a checkpoint keeps the optimizer shards of an FSDP run (a subdirectory of ``step-N``)."""


def _raw_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def save_sharded_optimizer(directory: str | Path, optimizer: Any, model: nn.Module) -> None:
    """Write every rank's optimizer shard under ``directory`` (created; collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, _raw_optimizer(optimizer))
    dcp.save({OPTIMIZER_KEY: state}, checkpoint_id=str(directory))


def load_sharded_optimizer(directory: str | Path, optimizer: Any, model: nn.Module) -> None:
    """Restore into ``optimizer`` the shard this rank saved with :func:`save_sharded_optimizer` (collective).

    The optimizer's state is first created (one step with lr 0 and zero gradients, as DCP does) so
    that DCP knows each tensor's shape and sharding; every value is then overwritten from disk.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise RetainFirstError(
            f"{directory} holds no sharded optimizer state (no .metadata); was it written by an FSDP run?"
        )
    raw = _raw_optimizer(optimizer)
    state = get_optimizer_state_dict(model, raw)
    dcp.load({OPTIMIZER_KEY: state}, checkpoint_id=str(directory))
    set_optimizer_state_dict(model, raw, state)
