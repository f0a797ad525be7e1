"""Moving gradients between ``param.grad`` and stashes, and averaging them across ranks.

The two passes of a step must not see each other's gradients: the forget gradients are moved out
of ``param.grad`` (a pointer swap, no copy) right after their backward, so ``param.grad`` only ever
accumulates one loss at a time. Under DDP every backward runs inside ``no_sync`` and both gradient
lists are averaged here at the accumulation boundary (DDP's own reducer would average the retain
pass only, and it silently skips a forward that stops early, as RMU's layer capture does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

Grads = list[Tensor | None]

# All-reduce gradients in flat buckets of about this many bytes (one collective per bucket).
BUCKET_BYTES = 64 * 2**20


def take_grads(params: list[nn.Parameter]) -> Grads:
    """Detach the current gradients from the parameters (they become None)."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def put_grads(params: list[nn.Parameter], grads: Grads) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g


def accumulate(stash: Grads, grads: Grads) -> Grads:
    """stash += grads, entry by entry (None means zero)."""
    out: Grads = []
    for s, g in zip(stash, grads, strict=True):
        if s is None:
            out.append(g)
        elif g is None:
            out.append(s)
        else:
            out.append(s.add_(g))
    return out


def to_local(grads: Grads) -> Grads:
    """Local shards of DTensor gradients (FSDP2); plain tensors pass through."""
    return [g.to_local() if g is not None and hasattr(g, "to_local") else g for g in grads]


def write_update(params: list[nn.Parameter], update: Grads) -> None:
    """Store the synthesized update as the parameters' gradients (into the DTensor shard under FSDP2).

    Under FSDP2 ``update[i]`` is this rank's local shard. It is wrapped back into a DTensor with the
    parameter's global shape and stride: inferring them from the local shard (``local rows x world``)
    is wrong whenever dim 0 does not divide by the world size (FSDP2's shards are then uneven).
    """
    for p, u in zip(params, update, strict=True):
        if u is None:
            p.grad = None
        elif p.grad is not None and hasattr(p.grad, "to_local"):
            local = p.grad.to_local()
            if local.data_ptr() != u.data_ptr():
                local.copy_(u)
        elif hasattr(p, "to_local"):  # DTensor parameter whose grad was None
            p.grad = shard_as_dtensor(u, p)
        else:
            p.grad = u


def shard_as_dtensor(local: Tensor, like: Tensor) -> Tensor:
    """``local`` (this rank's shard) as a DTensor laid out like the DTensor ``like``."""
    from torch.distributed.tensor import DTensor

    if local.shape != like.to_local().shape:
        raise ValueError(
            f"local update of shape {tuple(local.shape)} does not match this rank's parameter shard "
            f"{tuple(like.to_local().shape)}"
        )
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


@torch.no_grad()
def mean_across_ranks(grads: Grads, num_processes: int) -> None:
    """In-place mean over processes of every non-None gradient (flattened into buckets per dtype)."""
    if num_processes <= 1:
        return
    present = [g for g in grads if g is not None]
    bucket: list[Tensor] = []
    size = 0
    for g in present:
        if bucket and (g.dtype != bucket[0].dtype or size + g.numel() * g.element_size() > BUCKET_BYTES):
            _reduce_bucket(bucket, num_processes)
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        _reduce_bucket(bucket, num_processes)


def _reduce_bucket(bucket: list[Tensor], num_processes: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(num_processes)
    offset = 0
    for g in bucket:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The synthesizers' ``all_reduce_fn`` under FSDP: partial sums over shards -> global sums."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_finite(grads: Grads) -> bool:
    """True when no gradient holds NaN or inf (one device sync)."""
    flags = [torch.isfinite(g).all() for g in grads if g is not None]
    return bool(torch.stack(flags).all()) if flags else True
