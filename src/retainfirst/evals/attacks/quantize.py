"""Round-to-nearest weight quantization (fake quantization): is forgotten knowledge only hidden?

Unlearning often moves weights by less than one quantization step, so rounding the unlearned model
to 8 or 4 bits can snap it back towards the original and bring the knowledge back (Zhang et al.,
2024, "Catastrophic failure of LLM unlearning via quantization"). This module rounds each weight
matrix symmetrically per output channel, in groups of ``group_size`` input columns, and writes the
dequantized values back in the model's own dtype, so the normal evaluation code scores the result.
Pure torch, CPU or GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from retainfirst.errors import RetainFirstError


def check_quantization(bits: int, group_size: int) -> None:
    """Raise a one-line error for settings no quantizer here supports."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise RetainFirstError(f"quantization bits must be an integer from 2 to 8, got {bits!r}")
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or (group_size < 1 and group_size != -1)
    ):
        raise RetainFirstError(f"quantization group size must be >= 1 or -1 (whole row), got {group_size!r}")


def quantize_groups(
    weight: torch.Tensor, bits: int, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and scales of ``weight`` (2-D: rows = output channels).

    Each row is cut into groups of ``group_size`` consecutive columns (-1: the whole row; the last
    group is shorter when the row length is not a multiple). A group's scale is its largest |w|
    divided by ``2**(bits-1) - 1``, and its codes are ``round(w / scale)`` in
    ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (symmetric: zero is exact). Returns ``codes`` shaped
    like ``weight`` and ``scales`` of shape ``[rows, groups]``, in float32 (float64 for float64 input).
    """
    check_quantization(bits, group_size)
    if weight.ndim != 2:
        raise RetainFirstError(f"quantize_groups expects a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    size = cols if group_size == -1 or group_size >= cols else group_size
    pad = (-cols) % size
    work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if pad:
        work = nn.functional.pad(work, (0, pad))  # zeros change no group's largest |w|
    groups = work.reshape(rows, -1, size)
    top = 2 ** (bits - 1) - 1
    scales = groups.abs().amax(dim=-1) / top
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group stays zero
    codes = torch.clamp(torch.round(groups / safe.unsqueeze(-1)), -top, top)
    return codes.reshape(rows, -1)[:, :cols], scales


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """``weight`` rounded to the ``bits``-bit grid of its group and dequantized, in its own dtype."""
    codes, scales = quantize_groups(weight, bits, group_size)
    cols = weight.shape[1]
    size = cols if group_size == -1 or group_size >= cols else group_size
    per_column = scales.repeat_interleave(size, dim=1)[:, :cols]
    return (codes * per_column).to(weight.dtype)


@torch.no_grad()
def quantize_model(
    model: nn.Module, bits: int, group_size: int = 128, *, include_embeddings: bool = False
) -> dict[str, Any]:
    """Fake-quantize, in place, the weight of every ``nn.Linear`` (and of every ``nn.Embedding``
    when ``include_embeddings``). Biases, norms and a head tied to the embeddings (SmolLM2) stay
    in full precision unless embeddings are included. Returns counts for the result's settings."""
    check_quantization(bits, group_size)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    done: set[int] = set()
    tensors = parameters = 0
    for module in model.modules():
        kind = nn.Linear if not include_embeddings else (nn.Linear, nn.Embedding)
        weight = getattr(module, "weight", None)
        if not isinstance(module, kind) or not isinstance(weight, torch.Tensor) or id(weight) in done:
            continue
        if not include_embeddings and id(weight) in embedding_weights:
            continue  # a tied output head shares the embedding matrix
        done.add(id(weight))
        weight.copy_(fake_quantize(weight, bits, group_size))
        tensors += 1
        parameters += weight.numel()
    return {"bits": bits, "group_size": group_size, "tensors": tensors, "parameters": parameters}
