"""Symmetric multi-task aggregators (UPGrad, MGDA, CAGrad, ...) from torchjd, as synthesizers.

Unlike the retention-first strategies, these treat forgetting and retaining as two equal tasks and
take the update from torchjd's aggregator for the two-row Jacobian J = [gamma*g_f; alpha*g_r]
(alpha and gamma scale the task gradients *before* aggregation, so alpha = gamma = 1 is the plain
aggregator and other values are its run on rescaled losses).

Every aggregator here returns a combination of the rows, w_f*(gamma*g_f) + w_r*(alpha*g_r), whose
weights depend only on the 2x2 Gramian G = J J^T:

* UPGrad, DualProj, MGDA, CAGrad, Aligned-MTL and IMTL-G are torchjd ``GramianWeightedAggregator``
  s: their weights *are* ``<Name>Weighting()(G)``, which is called on G directly.
* NashMTL is a ``WeightedAggregator`` whose weighting reads its matrix M only through M M^T and
  ||w^T M|| = sqrt(w^T M M^T w); it is given a 2x2 factor L with L L^T = G, which is the same
  input. It is stateful (torchjd warm-starts its solver from the previous step's weights and
  refreshes them every ``update_weights_every`` steps); the state lives in the synthesizer
  instance, i.e. one training run, and is not saved in checkpoints.

G's three entries are the globally reduced sums the synthesis core already computes
(||g_f||^2, ||g_r||^2, <g_f, g_r>; float32 per-tensor partial sums, totals in float64, one
all_reduce under FSDP), so the result is exact under sharding and no Jacobian is ever stacked:
the update is then written chunk by chunk like any other strategy. Every rank solves the same
tiny problem on the same G, so all ranks apply the same weights.

torchjd is an optional extra (``pip install 'retainfirst[torchjd]'``, which also brings the
quadprog / cvxpy solvers some aggregators need). The names are always registered; validating the
options of one (a config, a sweep plan, or building it) fails with that install hint when a
needed package is missing. torchjd itself is imported only when a synthesizer is built.

Stats: ``weight_forget`` and ``weight_retain``, the coefficients applied to the unscaled g_f and
g_r (i.e. gamma*w_f and alpha*w_r).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from importlib.util import find_spec
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import model_validator
from torch import Tensor

from retainfirst.errors import RetainFirstError
from retainfirst.synthesis.base import PairSums, Synthesizer, SynthesizerOptions
from retainfirst.synthesis.registry import register_synthesizer
from retainfirst.validation import ListAsTuple, NonNegativeFloat, PositiveFloat, PositiveInt

INSTALL_HINT = "pip install 'retainfirst[torchjd]'"

GramianWeighting = Callable[[Tensor], Tensor]
"""2x2 float64 Gramian -> 2 weights (forget row first)."""

PreferenceVector = Annotated[tuple[NonNegativeFloat, NonNegativeFloat], ListAsTuple]
"""(forget, retain) preference weights; None means torchjd's default, the mean (0.5, 0.5)."""

_QUADPROG = ("torchjd", "numpy", "qpsolvers", "quadprog")


class TorchJDOptions(SynthesizerOptions):
    """Options of a torchjd-backed synthesizer; validating them checks its packages are installed."""

    packages: ClassVar[tuple[str, ...]] = ("torchjd",)

    @model_validator(mode="after")
    def _packages_installed(self) -> TorchJDOptions:
        missing = [name for name in self.packages if find_spec(name) is None]
        if missing:
            raise ValueError(f"needs {', '.join(missing)} (not installed); {INSTALL_HINT}")
        return self


class TorchJDSynthesizer(Synthesizer):
    """Applies a torchjd weighting to the global 2x2 Gramian of (gamma*g_f, alpha*g_r).

    Subclasses only say which torchjd weighting to build from their options.
    """

    Options: ClassVar[type[SynthesizerOptions]] = TorchJDOptions
    needs_pair_sums = True

    def __init__(self, alpha: float = 1.0, gamma: float = 1.0, **options: Any) -> None:
        super().__init__(alpha, gamma, **options)
        self._weighting = self.build_weighting()

    @abstractmethod
    def build_weighting(self) -> GramianWeighting:
        """The torchjd weighting for ``self.options`` (imports torchjd here, not at module import)."""

    def gramian(self, sums: PairSums) -> Tensor:
        """G = J J^T for J = [gamma*g_f; alpha*g_r], in float64, from the globally reduced sums."""
        forget_sq, retain_sq, dot = sums.total_forget_sq, sums.total_retain_sq, sums.total_dot
        g, a = self.gamma, self.alpha
        return torch.tensor(
            [[g * g * forget_sq, g * a * dot], [g * a * dot, a * a * retain_sq]], dtype=torch.float64
        )

    def weights(self, gramian: Tensor) -> tuple[float, float]:
        """torchjd's (w_f, w_r) for the scaled rows; (0, 0) when both rows are zero (nothing to do)."""
        if float(gramian.trace()) <= 0.0:
            return 0.0, 0.0
        try:
            w_forget, w_retain = (float(w) for w in self._weighting(gramian).reshape(-1).tolist())
        except (ValueError, ArithmeticError) as exc:  # a solver that gave up on this Gramian
            first = (str(exc).splitlines() or [""])[0]
            raise RetainFirstError(
                f"synthesizer {self.name!r}: torchjd failed on the Gramian {gramian.tolist()}: {first}"
            ) from None
        if not (math.isfinite(w_forget) and math.isfinite(w_retain)):
            raise RetainFirstError(
                f"synthesizer {self.name!r}: torchjd gave non-finite weights "
                f"({w_forget}, {w_retain}) for the Gramian {gramian.tolist()}"
            )
        return w_forget, w_retain

    def prepare(self, sums: PairSums) -> tuple[list[Any], dict[str, float]]:
        w_forget, w_retain = self.weights(self.gramian(sums))
        coefficients = (w_forget * self.gamma, w_retain * self.alpha)
        stats = {"weight_forget": coefficients[0], "weight_retain": coefficients[1]}
        return [coefficients] * len(sums.dot), stats

    def update_chunk(
        self, forget: Tensor, retain: Tensor, conflict: Tensor | None, coefficient: Any
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        forget_weight, retain_weight = coefficient
        return forget.mul(forget_weight).add_(retain, alpha=retain_weight), ()


def _preference(vector: tuple[float, float] | None) -> Tensor | None:
    return None if vector is None else torch.tensor(vector, dtype=torch.float64)


def gramian_factor(gramian: Tensor) -> Tensor:
    """A square L with L L^T = G (G symmetric PSD; tiny negative eigenvalues from rounding -> 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gramian)
    return eigenvectors * eigenvalues.clamp(min=0).sqrt()


class ProjectorOptions(TorchJDOptions):
    """Options of the two aggregators that project onto a dual cone with quadprog (upgrad, dualproj)."""

    packages: ClassVar[tuple[str, ...]] = _QUADPROG
    pref_vector: PreferenceVector | None = None
    norm_eps: NonNegativeFloat = 1e-4
    reg_eps: NonNegativeFloat = 1e-4


def _projector(options: ProjectorOptions) -> Any:
    from torchjd.linalg import QuadprogProjector

    return QuadprogProjector(norm_eps=options.norm_eps, reg_eps=options.reg_eps)


@register_synthesizer("upgrad")
class UPGradSynthesizer(TorchJDSynthesizer):
    """UPGrad (Quinton & Rey, 2024): each row projected onto the dual cone of both, then combined.

    The update never conflicts with either scaled gradient (<u, g_f> >= 0 and <u, g_r> >= 0, up to
    the solver's regularisation). Options: ``pref_vector`` (forget, retain) weights of the
    projected rows (default the mean), ``norm_eps`` and ``reg_eps`` of torchjd's quadprog projector.
    """

    Options = ProjectorOptions

    def build_weighting(self) -> GramianWeighting:
        from torchjd.aggregation import UPGradWeighting

        return UPGradWeighting(_preference(self.options.pref_vector), projector=_projector(self.options))


@register_synthesizer("dualproj")
class DualProjSynthesizer(TorchJDSynthesizer):
    """DualProj: the (preference-weighted) mean of the rows projected onto their dual cone (GEM-style).

    Options as for ``upgrad``: ``pref_vector``, ``norm_eps``, ``reg_eps``.
    """

    Options = ProjectorOptions

    def build_weighting(self) -> GramianWeighting:
        from torchjd.aggregation import DualProjWeighting

        return DualProjWeighting(_preference(self.options.pref_vector), projector=_projector(self.options))


@register_synthesizer("mgda")
class MGDASynthesizer(TorchJDSynthesizer):
    """MGDA (Désidéri 2012; Frank-Wolfe solver of Sener & Koltun 2018): the min-norm point of the hull.

    Options: ``epsilon`` (stop when the Frank-Wolfe step is below it) and ``max_iters``.
    """

    class Options(TorchJDOptions):
        epsilon: PositiveFloat = 1e-3
        max_iters: PositiveInt = 100

    def build_weighting(self) -> GramianWeighting:
        from torchjd.aggregation import MGDAWeighting

        return MGDAWeighting(epsilon=self.options.epsilon, max_iters=self.options.max_iters)


@register_synthesizer("cagrad")
class CAGradSynthesizer(TorchJDSynthesizer):
    """CAGrad (Liu et al., 2021): best worst-task improvement within a ball around the mean gradient.

    Options: ``c`` the ball's radius scale (torchjd has no default; 0.5 is the paper's common
    choice) and ``norm_eps``. Needs cvxpy with the Clarabel solver.
    """

    class Options(TorchJDOptions):
        packages: ClassVar[tuple[str, ...]] = ("torchjd", "numpy", "cvxpy", "clarabel")
        c: NonNegativeFloat = 0.5
        norm_eps: NonNegativeFloat = 1e-4

    def build_weighting(self) -> GramianWeighting:
        from torchjd.aggregation import CAGradWeighting

        return CAGradWeighting(c=self.options.c, norm_eps=self.options.norm_eps)


@register_synthesizer("aligned_mtl")
class AlignedMTLSynthesizer(TorchJDSynthesizer):
    """Aligned-MTL (Senushkin et al., 2023): rows rebalanced to equal-magnitude orthogonal components.

    Options: ``pref_vector`` (forget, retain) and ``scale_mode`` (min, median or rmse eigenvalue).
    """

    class Options(TorchJDOptions):
        pref_vector: PreferenceVector | None = None
        scale_mode: Literal["min", "median", "rmse"] = "min"

    def build_weighting(self) -> GramianWeighting:
        from torchjd.aggregation import AlignedMTLWeighting

        return AlignedMTLWeighting(_preference(self.options.pref_vector), scale_mode=self.options.scale_mode)


@register_synthesizer("imtl_g")
class IMTLGSynthesizer(TorchJDSynthesizer):
    """IMTL-G (Liu et al., 2021), torchjd's generalisation: equal projections of u on every row."""

    def build_weighting(self) -> GramianWeighting:
        from torchjd.aggregation import IMTLGWeighting

        return IMTLGWeighting()


@register_synthesizer("nash_mtl")
class NashMTLSynthesizer(TorchJDSynthesizer):
    """Nash-MTL (Navon et al., 2022): the Nash bargaining solution between the two tasks.

    Stateful like torchjd's (warm start from the previous step within one run). Options:
    ``max_norm`` (clip ||u|| to it; 0 disables), ``update_weights_every`` (reuse the weights for
    that many steps) and ``optim_niter``. Needs cvxpy with the ECOS solver.
    """

    class Options(TorchJDOptions):
        packages: ClassVar[tuple[str, ...]] = ("torchjd", "numpy", "cvxpy", "ecos")
        max_norm: NonNegativeFloat = 1.0
        update_weights_every: PositiveInt = 1
        optim_niter: PositiveInt = 20

    def build_weighting(self) -> GramianWeighting:
        from torchjd.aggregation import NashMTL

        options = self.options
        weighting = NashMTL(
            n_tasks=2,
            max_norm=options.max_norm,
            update_weights_every=options.update_weights_every,
            optim_niter=options.optim_niter,
        ).weighting
        return lambda gramian: weighting(gramian_factor(gramian))
