"""Dynamic loss scaling for fp16 when the update is synthesized from two gradient lists.

accelerate's GradScaler path unscales ``param.grad`` inside ``optimizer.step``, but the synthesizer
must see *unscaled* forget and retain gradients before the update exists. So the engine only lets
accelerate scale the losses, unscales both lists itself, and drives the scale like GradScaler does:
on overflow skip the step and back off, after ``growth_interval`` good steps grow.
"""

from __future__ import annotations

from typing import Any

from torch.amp import GradScaler

from retainfirst.engine.grads import Grads


class LossScale:
    def __init__(self, scaler: GradScaler | None) -> None:
        self.scaler = scaler
        self.good_steps = 0

    @property
    def enabled(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def unscale(self, *grad_lists: Grads) -> None:
        if not self.enabled:
            return
        inverse = 1.0 / self.scaler.get_scale()
        for grads in grad_lists:
            for g in grads:
                if g is not None:
                    g.mul_(inverse)

    def update(self, overflow: bool) -> None:
        """Back off after an overflow; grow after ``growth_interval`` consecutive good steps."""
        if not self.enabled:
            return
        scale = self.scaler.get_scale()
        if overflow:
            self.good_steps = 0
            self.scaler.update(scale * self.scaler.get_backoff_factor())
            return
        self.good_steps += 1
        if self.good_steps >= self.scaler.get_growth_interval():
            self.good_steps = 0
            self.scaler.update(scale * self.scaler.get_growth_factor())

    def state_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {"scaler": self.scaler.state_dict(), "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state["scaler"])
            self.good_steps = state["good_steps"]
