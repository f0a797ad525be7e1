"""cos(delta theta, g_r) and cos(delta theta, g_f): the retention guarantee measured on the weights.

A synthesizer guarantees something about its update u (e.g. <u, g_r> >= 0), but the weights move by
what the optimizer makes of u: Adam's per-element step sizes, momentum and weight decay can turn
an update aligned with g_r into a weight change that is not. :class:`StepCosines` measures the
actual change delta theta = theta_after - theta_before of one optimizer step against both raw
gradients of that step (logged as ``cos_step_retain``, ``cos_step_forget`` and ``norm_step``).

Memory while a step is measured (``TrainConfig.log_step_cosines``), in the gradients' dtype:
one copy of the trainable weights (taken just before the optimizer step), one copy of g_r (in
gradient space the synthesizer writes u into g_r's storage; not needed in update space, where g_r
is left intact) and g_f kept alive through the step instead of being freed after synthesis. So at
most three extra copies of the trainable parameters at the step's peak. Sums are float32 per chunk
of :data:`CHUNK_ELEMENTS` (:data:`CPU_CHUNK_ELEMENTS` on CPU), accumulated in float64 and summed
over FSDP shards; delta theta is computed one chunk at a time into a reused buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from retainfirst.synthesis.base import chunk_elements

Grads = list[Tensor | None]
CHUNK_ELEMENTS = 1 << 21
CPU_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32: a chunk's operands stay in cache
_RETAIN_DOT, _FORGET_DOT, _STEP_SQ, _RETAIN_SQ, _FORGET_SQ = range(5)


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _cos(dot: float, a_sq: float, b_sq: float) -> float:
    if a_sq <= 0.0 or b_sq <= 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(a_sq * b_sq)))


class StepCosines:
    """Keeps what one step's cosines need; call :meth:`snapshot` before and :meth:`finish` after the step.

    ``consumed``: the synthesizer will write its update into these gradient lists (gradient space),
    so g_r (and g_f where g_r is None) are copied now.
    """

    def __init__(
        self, forget_grads: Sequence[Tensor | None], retain_grads: Sequence[Tensor | None], consumed: bool
    ):
        if consumed:
            self.retain: Grads = [None if r is None else r.detach().clone() for r in retain_grads]
            self.forget: Grads = [
                f.detach().clone() if f is not None and r is None else f
                for f, r in zip(forget_grads, retain_grads, strict=True)
            ]
        else:
            self.retain, self.forget = list(retain_grads), list(forget_grads)
        self.before: Grads | None = None
        copies = [c for c, r in zip(self.retain, retain_grads, strict=True) if c is not None and c is not r]
        copies += [c for c, f in zip(self.forget, forget_grads, strict=True) if c is not None and c is not f]
        self.copied_bytes = sum(t.numel() * t.element_size() for t in copies)

    @torch.no_grad()
    def snapshot(self, params: Sequence[Tensor]) -> None:
        """Copy the weights (local shards) just before the optimizer step."""
        self.before = [_local(p).detach().clone() for p in params]

    def extra_bytes(self) -> int:
        """Bytes of the copies held now: the weights' snapshot and the gradient copies made here."""
        held = sum(t.numel() * t.element_size() for t in (self.before or []) if t is not None)
        return held + self.copied_bytes

    @torch.no_grad()
    def finish(
        self, params: Sequence[Tensor], all_reduce_fn: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, float]:
        """The cosines of the step just taken; frees every copy."""
        if self.before is None:
            raise RuntimeError("StepCosines.finish() before snapshot()")
        device = self.before[0].device if self.before else torch.device("cpu")
        columns: list[list[Tensor]] = [[] for _ in range(5)]  # float32 partial sums, one per chunk
        for param, before, forget, retain in zip(params, self.before, self.forget, self.retain, strict=True):
            after = _local(param).detach().reshape(-1)
            before_flat = before.reshape(-1)
            dtype = torch.promote_types(after.dtype, torch.float32)
            numel = after.numel()
            chunk = chunk_elements(after.device, CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS)
            same_dtype = after.dtype == dtype and before_flat.dtype == dtype
            # delta theta of one chunk, written into one reused cache-sized buffer
            scratch = torch.empty(min(numel, chunk), dtype=dtype, device=after.device)
            grads = [
                (g.reshape(-1), dot_at, sq_at)
                for g, dot_at, sq_at in ((retain, _RETAIN_DOT, _RETAIN_SQ), (forget, _FORGET_DOT, _FORGET_SQ))
                if g is not None
            ]
            for start in range(0, numel, chunk):
                stop = min(start + chunk, numel)
                if same_dtype:
                    delta = torch.sub(after[start:stop], before_flat[start:stop], out=scratch[: stop - start])
                else:
                    delta = after[start:stop].to(dtype) - before_flat[start:stop].to(dtype)
                columns[_STEP_SQ].append(torch.dot(delta, delta))
                for flat, dot_at, sq_at in grads:
                    piece = flat[start:stop].to(dtype)
                    columns[dot_at].append(torch.dot(delta, piece))
                    columns[sq_at].append(torch.dot(piece, piece))
        sums = torch.stack(
            [
                torch.stack(column).to(device=device, dtype=torch.float64).sum()
                if column
                else torch.zeros((), dtype=torch.float64, device=device)
                for column in columns
            ]
        )
        self.before = self.retain = self.forget = None  # type: ignore[assignment]
        if all_reduce_fn is not None:
            sums = all_reduce_fn(sums)
        retain_dot, forget_dot, step_sq, retain_sq, forget_sq = sums.cpu().tolist()
        return {
            "cos_step_retain": _cos(retain_dot, step_sq, retain_sq),
            "cos_step_forget": _cos(forget_dot, step_sq, forget_sq),
            "norm_step": math.sqrt(max(step_sq, 0.0)),
        }
