"""AdamW whose moments are float32 whatever the parameter dtype.

``torch.optim.AdamW`` keeps ``exp_avg`` / ``exp_avg_sq`` in the parameter dtype. With bfloat16
weights that breaks the second moment: bf16 has 8 significant bits, so ``0.999 * v`` rounds back
to ``v`` and ``exp_avg_sq`` can never decay (the step size stays tied to the largest gradient ever
seen). :class:`Float32AdamW` keeps both moments in float32 (float64 stays float64), computes the
update in that precision and writes the result back into the parameter's own dtype.

For float32 parameters every operation is the one ``torch.optim.AdamW`` (single-tensor path, the
CPU default) performs, in the same order, so the two give bit-identical results.

:class:`UpdateSpaceAdamW` (``synthesis_space: update``) synthesizes in the optimizer's update space:
two Adam moment sets, one per gradient, so each gradient is preconditioned by its own history and
the synthesizer combines the two Adam directions instead of the raw gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

Grads = list[Tensor | None]

ADAM_CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk of :class:`Float32AdamW`'s update on CPU: 1 MiB of float32, so a chunk's
operands stay in cache (~2x faster than whole-tensor passes on CPU, same bits)."""


def moment_dtype(param: Tensor) -> torch.dtype:
    """float32 for half-precision parameters, the parameter's dtype when it is already wider."""
    return torch.promote_types(param.dtype, torch.float32)


class Float32AdamW(torch.optim.Optimizer):
    """Decoupled weight decay Adam (Loshchilov & Hutter) with float32 moments; hyperparameters as AdamW."""

    moment_keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"invalid AdamW hyperparameters lr={lr} betas={betas} eps={eps} wd={weight_decay}"
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _state_for(self, param: Tensor) -> dict[str, Tensor]:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # on CPU, as torch's AdamW
            dtype = moment_dtype(param)
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, weight_decay = group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Float32AdamW does not support sparse gradients")
                state = self._state_for(param)
                state["step"] += 1
                _adamw_update(param, param.grad, state, lr, beta1, beta2, eps, weight_decay)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except the moments keep their saved float32 values.

        ``Optimizer.load_state_dict`` casts every floating state tensor to the parameter dtype,
        which for bf16 parameters would round the moments to bf16 on every resume.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for param, saved_id in zip(params, saved_ids, strict=True):
            if saved_id not in saved:
                continue
            for key in self.moment_keys:
                if key in saved[saved_id]:
                    value = saved[saved_id][key]
                    self.state[param][key] = value.to(device=param.device, dtype=moment_dtype(param)).clone()


def _adamw_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW update of ``param`` (``state["step"]`` already incremented), in the moments' precision.

    Plain contiguous CPU tensors are updated in flat chunks of :data:`ADAM_CHUNK_ELEMENTS` so that every
    operation of a chunk reads data still in cache (one trip through memory instead of eight).
    Each element sees the same operations in the same order either way, so the chunked and the
    whole-tensor paths give bit-identical results.
    """
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    step = state["step"].item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    tensors = (param, grad, exp_avg, exp_avg_sq)
    update = functools.partial(
        _adamw_chunk,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt,
    )
    # Chunks only pay on CPU (cache reuse); on accelerators they would only add kernel launches.
    if param.device.type != "cpu" or any(hasattr(t, "to_local") or not t.is_contiguous() for t in tensors):
        update(param, grad, exp_avg, exp_avg_sq, scratch=None)
        return
    flat = [t.view(-1) for t in tensors]
    numel = flat[0].numel()
    scratch = torch.empty(min(numel, ADAM_CHUNK_ELEMENTS), dtype=exp_avg.dtype, device=exp_avg.device)
    for start in range(0, numel, ADAM_CHUNK_ELEMENTS):
        stop = min(start + ADAM_CHUNK_ELEMENTS, numel)
        update(*(t[start:stop] for t in flat), scratch=scratch[: stop - start])


def _adamw_chunk(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step_size: float,
    bias_correction2_sqrt: float,
    scratch: Tensor | None,
) -> None:
    """torch's single-tensor AdamW arithmetic on one slice; ``scratch`` (if given) holds the denominator."""
    # Work on the parameter itself when it already has the moments' precision, else on a copy.
    work = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
    grad = grad.to(exp_avg.dtype)
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt() if scratch is None else torch.sqrt(exp_avg_sq, out=scratch)
    denom.div_(bias_correction2_sqrt).add_(eps)
    work.addcdiv_(exp_avg, denom, value=-step_size)
    if work is not param:
        param.copy_(work)


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2), the tensor itself otherwise (same storage either way)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class UpdateSpaceAdamW(Float32AdamW):
    """AdamW in which the synthesizer combines Adam directions: one moment set per gradient.

    Each step, :meth:`precondition` feeds the forget gradient g_f into (m_f, v_f) and the retain
    gradient g_r into (m_r, v_r) (Adam's EMAs, float32) and returns the bias-corrected directions
    d = m_hat / (sqrt(v_hat) + eps) of both; the synthesizer turns (d_f, d_r) into u and
    :meth:`step` moves the weights by -lr * u after decoupled weight decay. With ``retain_only``
    (alpha = 1) this is AdamW on g_r alone; with ``sum`` it is *not* Adam on g_f + g_r: each
    gradient gets its own per-element step size, so neither can drown the other's scale.
    The weights alpha/gamma scale directions, i.e. act as per-side learning-rate multipliers.

    Memory: four float32 moments per trainable element (16 bytes/param: twice AdamW's 8), plus the
    two float32 directions while a step is synthesized (8 bytes/param, u reuses d_r's storage).
    A gradient that is None for one side is read as zeros (its moments decay); a parameter with
    neither gradient is left alone, as AdamW leaves a parameter without gradient.
    """

    moment_keys = ("exp_avg_forget", "exp_avg_sq_forget", "exp_avg_retain", "exp_avg_sq_retain")

    def _state_for(self, param: Tensor) -> dict[str, Tensor]:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            dtype = moment_dtype(param)
            for key in self.moment_keys:
                state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def _params_with_groups(self) -> list[tuple[Tensor, dict[str, Any]]]:
        return [(param, group) for group in self.param_groups for param in group["params"]]

    @torch.no_grad()
    def precondition(
        self,
        forget_grads: Grads,
        retain_grads: Grads,
        forget_scale: float = 1.0,
        retain_scale: float = 1.0,
    ) -> tuple[Grads, Grads]:
        """Update both moment sets with (scale x gradient) and return the directions (d_f, d_r).

        The gradients (local shards under FSDP2, one per parameter in optimizer order) are read,
        never modified; the directions are new tensors in the moments' dtype.
        """
        pairs = self._params_with_groups()
        if not len(forget_grads) == len(retain_grads) == len(pairs):
            raise ValueError(
                f"expected {len(pairs)} forget and retain gradients, got {len(forget_grads)} and "
                f"{len(retain_grads)}"
            )
        forget_dirs: Grads = []
        retain_dirs: Grads = []
        for (param, group), forget, retain in zip(pairs, forget_grads, retain_grads, strict=True):
            if forget is None and retain is None:
                forget_dirs.append(None)
                retain_dirs.append(None)
                continue
            state = self._state_for(param)
            state["step"] += 1
            step = state["step"].item()
            beta1, beta2 = group["betas"]
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            for grad, scale, side, out in (
                (forget, forget_scale, "forget", forget_dirs),
                (retain, retain_scale, "retain", retain_dirs),
            ):
                exp_avg, exp_avg_sq = _local(state[f"exp_avg_{side}"]), _local(state[f"exp_avg_sq_{side}"])
                if grad is None:
                    grad = torch.zeros_like(exp_avg)
                else:
                    grad = grad.to(exp_avg.dtype)  # a view when no cast is needed: read only
                    if scale != 1.0:
                        grad = grad.mul(scale)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                out.append(torch.div(exp_avg, denom).div_(bias_correction1))
        return forget_dirs, retain_dirs

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, updates: Grads | None = None, closure: Callable[[], float] | None = None
    ) -> None:
        """theta <- theta * (1 - lr * weight_decay) - lr * u, computed in the moments' precision.

        ``updates``: the synthesized u, one tensor (local shard under FSDP2) or None per parameter.
        """
        if updates is None or closure is not None:
            raise RuntimeError("UpdateSpaceAdamW.step takes the synthesized updates (see precondition())")
        pairs = self._params_with_groups()
        if len(updates) != len(pairs):
            raise ValueError(f"expected {len(pairs)} updates, got {len(updates)}")
        for (param, group), update in zip(pairs, updates, strict=True):
            if update is None:
                continue
            lr, weight_decay = group["lr"], group["weight_decay"]
            local = _local(param)
            dtype = moment_dtype(local)
            work = local if local.dtype == dtype else local.to(dtype)
            if weight_decay != 0:
                work.mul_(1 - lr * weight_decay)
            work.add_(update.to(dtype), alpha=-lr)
            if work is not local:
                local.copy_(work)
