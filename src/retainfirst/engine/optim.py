"""AdamW whose moments are float32 whatever the parameter dtype.

``torch.optim.AdamW`` keeps ``exp_avg`` / ``exp_avg_sq`` in the parameter dtype. With bfloat16
weights that breaks the second moment: bf16 has 8 significant bits, so ``0.999 * v`` rounds back
to ``v`` and ``exp_avg_sq`` can never decay (the step size stays tied to the largest gradient ever
seen). :class:`Float32AdamW` keeps both moments in float32 (float64 stays float64), computes the
update in that precision and writes the result back into the parameter's own dtype.

For float32 parameters every operation is the one ``torch.optim.AdamW`` (single-tensor path, the
CPU default) performs, in the same order, so the two give bit-identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


def moment_dtype(param: Tensor) -> torch.dtype:
    """float32 for half-precision parameters, the parameter's dtype when it is already wider."""
    return torch.promote_types(param.dtype, torch.float32)


class Float32AdamW(torch.optim.Optimizer):
    """Decoupled weight decay Adam (Loshchilov & Hutter) with float32 moments; hyperparameters as AdamW."""

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
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # Work on the parameter itself when it already has the moments' precision, else on a copy.
                work = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
                grad = param.grad.to(exp_avg.dtype)

                state["step"] += 1
                if weight_decay != 0:
                    work.mul_(1 - lr * weight_decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                bias_correction2_sqrt = bias_correction2**0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                work.addcdiv_(exp_avg, denom, value=-step_size)
                if work is not param:
                    param.copy_(work)
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
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved[saved_id]:
                    value = saved[saved_id][key]
                    self.state[param][key] = value.to(device=param.device, dtype=moment_dtype(param)).clone()
