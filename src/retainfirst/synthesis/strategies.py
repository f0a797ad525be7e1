"""The built-in strategies. gamma weights the forget gradient g_f, alpha the retain gradient g_r.

Each docstring gives the exact rule and what happens for a parameter with only one gradient (the
missing one counts as zeros). Inner products <.,.> and norms are float32 sums over the elements in
scope: one parameter tensor ("per tensor") or all parameters together ("global"), over all shards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from retainfirst.synthesis.base import PairSums, Synthesizer, SynthesizerOptions
from retainfirst.synthesis.registry import register_synthesizer
from retainfirst.validation import NonNegativeFloat

_NO_COUNTS: tuple[Tensor, ...] = ()


def _linear(forget: Tensor, retain: Tensor, forget_weight: float, retain_weight: float) -> Tensor:
    """forget_weight * f + retain_weight * r in one fresh float32 buffer."""
    return forget.mul(forget_weight).add_(retain, alpha=retain_weight)


@register_synthesizer("sum")
class SumSynthesizer(Synthesizer):
    """u = gamma*g_f + alpha*g_r: the plain weighted sum (the "naive" baseline).

    One-sided: only g_r -> alpha*g_r; only g_f -> gamma*g_f.
    """

    def update_chunk(
        self, forget: Tensor, retain: Tensor, conflict: Tensor | None, coefficient: Any
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return _linear(forget, retain, self.gamma, self.alpha), _NO_COUNTS


@register_synthesizer("retain_only")
class RetainOnlySynthesizer(Synthesizer):
    """u = alpha*g_r, ignoring g_f (and gamma): a sanity baseline that must not forget anything.

    Useful to separate what the retain loss alone does to utility from the forget side's effect.
    One-sided: only g_r -> alpha*g_r; only g_f -> zeros.
    """

    def update_chunk(
        self, forget: Tensor, retain: Tensor, conflict: Tensor | None, coefficient: Any
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return retain.mul(self.alpha), _NO_COUNTS


@register_synthesizer("pcgrad")
class PCGradSynthesizer(Synthesizer):
    """Module-wise PCGrad, retention first: only the forget gradient is ever projected.

    Per parameter tensor: d = <g_f, g_r>; if d < 0, g_f <- g_f - d / (||g_r||^2 + eps) * g_r, which
    removes g_f's component against g_r; then u = gamma*g_f + alpha*g_r. Written as
    u = gamma*g_f + (alpha - gamma*c)*g_r with c = d/(||g_r||^2 + eps) (c = 0 when d >= 0).
    On FSDP shards d and ||g_r||^2 are reduced per tensor first, so every shard projects alike.

    One-sided: d = 0, so no projection: only g_r -> alpha*g_r; only g_f -> gamma*g_f.
    Stats: ``projected_fraction`` = share of tensors (with any gradient) that were projected.
    Option ``eps`` (default 1e-10) keeps the division finite.
    """

    class Options(SynthesizerOptions):
        eps: NonNegativeFloat = 1e-10  # keeps the division finite

    needs_pair_sums = True

    def _projection(self, dot: float, retain_sq: float) -> float:
        """c = d / (||g_r||^2 + eps) when d < 0, else 0 (no projection)."""
        denominator = retain_sq + self.options.eps
        if dot >= 0 or denominator <= 0:
            return 0.0
        return dot / denominator

    def prepare(self, sums: PairSums) -> tuple[list[Any], dict[str, float]]:
        weights: list[Any] = []
        projected = tensors = 0
        for dot, retain_sq, numel in zip(sums.dot, sums.retain_sq, sums.numel, strict=True):
            coefficient = self._projection(dot, retain_sq)
            weights.append(self.alpha - self.gamma * coefficient)
            tensors += numel > 0
            projected += coefficient != 0.0
        return weights, {"projected_fraction": projected / tensors if tensors else 0.0}

    def update_chunk(
        self, forget: Tensor, retain: Tensor, conflict: Tensor | None, coefficient: Any
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return _linear(forget, retain, self.gamma, coefficient), _NO_COUNTS


@register_synthesizer("pcgrad_global")
class GlobalPCGradSynthesizer(PCGradSynthesizer):
    """PCGrad with one projection over all parameters together (retention first).

    d = sum over tensors of <g_f, g_r>, ||g_r||^2 likewise; if d < 0,
    g_f <- g_f - d / (||g_r||^2 + eps) * g_r everywhere; u = gamma*g_f + alpha*g_r.

    One-sided: a tensor with only g_r gets (alpha - gamma*c)*g_r (it carries part of the global
    projection); only g_f -> gamma*g_f (g_r = 0 there adds nothing).
    Stats: ``projected_fraction`` (1.0 or 0.0) and ``projection_coefficient`` c (<= 0).
    """

    def prepare(self, sums: PairSums) -> tuple[list[Any], dict[str, float]]:
        coefficient = self._projection(sums.total_dot, sums.total_retain_sq)
        stats = {"projected_fraction": float(coefficient != 0.0), "projection_coefficient": coefficient}
        return [self.alpha - self.gamma * coefficient] * len(sums.dot), stats


@register_synthesizer("blur")
class BLURSynthesizer(Synthesizer):
    """Global projection of the retain gradient off the forget direction (BLUR-style).

    g_r <- g_r - <g_r, g_f> / (||g_f||^2 + eps) * g_f, over all parameters, unconditionally (whatever
    the sign of the inner product); u = gamma*g_f + alpha*g_r, i.e. u = (gamma - alpha*c)*g_f +
    alpha*g_r with c = <g_r, g_f> / (||g_f||^2 + eps).

    One-sided: only g_r -> alpha*g_r; only g_f -> (gamma - alpha*c)*g_f.
    Stats: ``projection_coefficient`` c. Option ``eps`` (default 1e-10).
    """

    class Options(SynthesizerOptions):
        eps: NonNegativeFloat = 1e-10

    needs_pair_sums = True

    def prepare(self, sums: PairSums) -> tuple[list[Any], dict[str, float]]:
        denominator = sums.total_forget_sq + self.options.eps
        coefficient = sums.total_dot / denominator if denominator > 0 else 0.0
        weight = self.gamma - self.alpha * coefficient
        return [weight] * len(sums.dot), {"projection_coefficient": coefficient}

    def update_chunk(
        self, forget: Tensor, retain: Tensor, conflict: Tensor | None, coefficient: Any
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return _linear(forget, retain, coefficient, self.alpha), _NO_COUNTS


@register_synthesizer("sago")
class SAGOSynthesizer(Synthesizer):
    """SAGO: element-wise sign gating, retention first.

    Conflict c = sign(g_f)*sign(g_r) < 0 (a zero on either side is no conflict);
    u = alpha*g_r where c, gamma*g_f elsewhere. So u*g_r >= 0 element-wise: the update never opposes
    the retain gradient.

    Option ``keep_retain_where_forget_zero`` (default False = the published rule): also use alpha*g_r
    where g_f == 0 exactly. The published rule drops the retain gradient there, e.g. for embedding
    rows of tokens seen only in the retain batch.

    One-sided: only g_r -> zeros under the published rule (g_f = 0 is no conflict, so gamma*0), or
    alpha*g_r with the option; only g_f -> gamma*g_f.
    Stats: ``replaced_fraction`` = share of elements where alpha*g_r (g_r != 0) was used instead of
    gamma*g_f (equals conflict_fraction under the published rule).
    """

    class Options(SynthesizerOptions):
        keep_retain_where_forget_zero: bool = False

    uses_conflict_mask = True
    element_counters = ("replaced_fraction",)

    def update_chunk(
        self, forget: Tensor, retain: Tensor, conflict: Tensor | None, coefficient: Any
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        assert conflict is not None
        take_retain = conflict  # float 0/1: selecting by exact products is exact and fast
        if self.options.keep_retain_where_forget_zero:
            forget_zero = torch.sign(forget).abs_().neg_().add_(1)
            take_retain = forget_zero.mul_(torch.sign(retain).abs_()).add_(conflict)  # disjoint sets
        update = retain.mul(self.alpha).mul_(take_retain)
        update.addcmul_(forget, torch.rsub(take_retain, 1), value=self.gamma)
        return update, (take_retain.sum(),)


@register_synthesizer("sago_prefer_retain")
class SAGOPreferRetainSynthesizer(Synthesizer):
    """SAGO variant that keeps the retain gradient everywhere and gates only the forget gradient.

    u = alpha*g_r where sign(g_f)*sign(g_r) < 0, gamma*g_f + alpha*g_r elsewhere.

    One-sided: only g_r -> alpha*g_r; only g_f -> gamma*g_f.
    Stats: ``replaced_fraction`` = share of elements whose forget term was dropped (the conflicts).
    """

    uses_conflict_mask = True
    element_counters = ("replaced_fraction",)

    def update_chunk(
        self, forget: Tensor, retain: Tensor, conflict: Tensor | None, coefficient: Any
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        assert conflict is not None
        update = retain.mul(self.alpha)
        update.addcmul_(forget, torch.rsub(conflict, 1), value=self.gamma)
        return update, (conflict.sum(),)
