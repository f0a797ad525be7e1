"""The synthesizer machinery shared by every strategy: validation, chunked passes, reductions, stats.

A strategy only says how one chunk of the update is computed from the matching chunks of g_f and
g_r (plus per-tensor coefficients for strategies that need global sums). This module does the rest
so that every strategy gets the same guarantees:

* **Memory.** Gradients are walked tensor by tensor and, inside a tensor, in chunks of
  :data:`CHUNK_ELEMENTS` elements. The update is written back into the retain gradient's storage
  (the forget gradient's where the retain one is None), so the only extra memory is a few
  chunk-sized float32 temporaries -- never a flattened copy of all gradients. (A non-contiguous
  gradient, which training never produces, costs one staging copy of that tensor.)
* **Precision.** Every dot product, norm and count is accumulated in float32 (bf16/fp16 chunks are
  upcast one chunk at a time; float64 gradients stay float64); the update is computed in that
  precision and cast back to the gradients' dtype when written.
* **Sharding (FSDP).** Every global scalar is a sum of per-shard partial sums. The partial sums of
  one phase are packed into one small float32 vector and passed once through ``all_reduce_fn``, so
  all ranks see the same totals, compute the same coefficients and report the same stats. A strategy
  that needs global sums before it can write the update (pcgrad, pcgrad_global, blur) costs two
  reductions per step; the others one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from retainfirst.errors import RetainFirstError
from retainfirst.validation import NonNegativeFloat, Options, parse_options

AllReduceFn = Callable[[Tensor], Tensor]
"""Sums a 1-D float32 tensor of partial sums across ranks and returns the summed tensor."""

CHUNK_ELEMENTS = 1 << 21
"""Elements per chunk: bounds the float32 temporaries (~8 MiB each) whatever the tensor size."""

CPU_CHUNK_ELEMENTS = 1 << 16
"""At most this many elements per chunk on CPU (256 KiB of float32): the few operands of a chunk then
stay in a core's L2 cache, so each gradient is read from memory once per pass instead of once per
operation (about 2x faster on CPU; on accelerators bigger chunks mean fewer kernel launches)."""


def chunk_elements(device: torch.device, full: int | None = None, cpu_cap: int | None = None) -> int:
    """Chunk length on ``device``: ``full`` (default :data:`CHUNK_ELEMENTS`), capped on CPU at
    ``cpu_cap`` (default :data:`CPU_CHUNK_ELEMENTS`). Other chunked passes (the step cosines) pass
    their own sizes."""
    full = CHUNK_ELEMENTS if full is None else full
    cpu_cap = CPU_CHUNK_ELEMENTS if cpu_cap is None else cpu_cap
    return min(full, cpu_cap) if device.type == "cpu" else full


# Columns of the per-tensor phase-1 sums.
_FF, _RR, _FR, _CONFLICTS, _NUMEL = range(5)
_PAIR_COLUMNS = 5


@dataclass(frozen=True)
class PairSums:
    """Global (all shards) sums of the gradient pair of every parameter tensor, in list order.

    A missing gradient counts as zeros; entries where both gradients are None are all zero.
    """

    forget_sq: list[float]
    retain_sq: list[float]
    dot: list[float]
    conflicts: list[float]
    numel: list[float]

    @classmethod
    def from_matrix(cls, matrix: Tensor) -> PairSums:
        columns = matrix.double().cpu().t().tolist()
        return cls(*columns)

    @property
    def total_forget_sq(self) -> float:
        return math.fsum(self.forget_sq)

    @property
    def total_retain_sq(self) -> float:
        return math.fsum(self.retain_sq)

    @property
    def total_dot(self) -> float:
        return math.fsum(self.dot)


class SynthesizerOptions(Options):
    """Options of a strategy: subclass it as ``Options`` inside the strategy (none by default)."""


class _Weights(Options):
    alpha: NonNegativeFloat = 1.0
    gamma: NonNegativeFloat = 1.0


def _cos(dot: float, a_sq: float, b_sq: float) -> float:
    """Cosine from a dot product and two squared norms; 0 when either vector is zero."""
    if a_sq <= 0.0 or b_sq <= 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(a_sq * b_sq)))


def _fraction(count: float, total: float) -> float:
    return min(1.0, max(0.0, count / total)) if total > 0 else 0.0


def _validated_pairs(
    forget_grads: Sequence[Tensor | None], retain_grads: Sequence[Tensor | None]
) -> list[tuple[Tensor | None, Tensor | None]]:
    """Check both gradient lists before anything is modified; return them zipped."""
    for label, grads in (("forget_grads", forget_grads), ("retain_grads", retain_grads)):
        if isinstance(grads, Tensor) or not isinstance(grads, Sequence):
            raise RetainFirstError(
                f"{label} must be a list of tensors (one per trainable parameter), got {type(grads).__name__}"
            )
    if len(forget_grads) != len(retain_grads):
        raise RetainFirstError(
            f"forget_grads has {len(forget_grads)} entries but retain_grads has {len(retain_grads)}; "
            "pass one entry (tensor or None) per trainable parameter, in the same order"
        )
    pairs = list(zip(forget_grads, retain_grads, strict=True))
    for index, (forget, retain) in enumerate(pairs):
        for label, grad in (("forget_grads", forget), ("retain_grads", retain)):
            if grad is None:
                continue
            if not isinstance(grad, Tensor):
                raise RetainFirstError(
                    f"{label}[{index}] must be a tensor or None, got {type(grad).__name__}"
                )
            if not grad.is_floating_point():
                raise RetainFirstError(
                    f"{label}[{index}] must be a floating-point tensor, got dtype {grad.dtype}"
                )
        if forget is None or retain is None:
            continue
        if forget.shape != retain.shape:
            raise RetainFirstError(
                f"gradient {index}: forget shape {tuple(forget.shape)} != retain shape "
                f"{tuple(retain.shape)}; both lists must follow the same parameter order"
            )
        if forget.dtype != retain.dtype:
            raise RetainFirstError(
                f"gradient {index}: forget dtype {forget.dtype} != retain dtype {retain.dtype}; "
                "compute both gradients under the same precision settings"
            )
        if forget.device != retain.device:
            raise RetainFirstError(
                f"gradient {index}: forget is on {forget.device} but retain is on {retain.device}"
            )
    return pairs


def _reduce(partials: Tensor, all_reduce_fn: AllReduceFn | None) -> Tensor:
    """Pass one packed float32 vector of partial sums through the reduction hook (None = one shard)."""
    if all_reduce_fn is None:
        return partials
    reduced = all_reduce_fn(partials)
    if not isinstance(reduced, Tensor) or reduced.numel() != partials.numel():
        raise RetainFirstError(
            "all_reduce_fn must return a tensor with as many elements as it was given "
            f"({partials.numel()}), got {reduced!r:.80}"
        )
    return reduced.reshape(partials.shape).to(device=partials.device, dtype=torch.float32)


def _conflict_mask(forget: Tensor, retain: Tensor, out: Tensor | None = None) -> Tensor:
    """Strict sign conflict sign(f)*sign(r) < 0 as a float32 0/1 mask (zero on either side: 0).

    Computed as sign(f) * r < 0, which is the same test: multiplying r by +-1 is exact (no product
    can underflow, unlike f*r < 0), 0 * r is never negative and NaNs compare false either way.
    A float mask (not bool) because torch's CPU kernels for bool logic, ``where`` and
    ``masked_fill`` are an order of magnitude slower than float arithmetic; multiplying by an
    exact 0/1 keeps selections exact. ``out``: a buffer of the chunk's length and dtype to
    compute in (the mask is that buffer), instead of a fresh tensor.
    """
    return torch.sign(forget, out=out).mul_(retain).lt_(0)


class _Pair:
    """One parameter's gradient pair, walked in flat chunks upcast to float32 (if narrower).

    A missing side is read as zeros. The update goes into ``destination`` (retain's storage, or the
    forget gradient's when retain is None); non-contiguous destinations are written through a
    staging buffer because only contiguous tensors have a flat view.
    """

    def __init__(self, forget: Tensor | None, retain: Tensor | None) -> None:
        self.destination: Tensor = retain if retain is not None else forget  # type: ignore[assignment]
        self.numel = self.destination.numel()
        self.device = self.destination.device
        # float32 for float32/bf16/fp16 gradients; float64 gradients keep their precision.
        self.compute_dtype = torch.promote_types(self.destination.dtype, torch.float32)
        self._forget = forget.reshape(-1) if forget is not None else None
        self._retain = retain.reshape(-1) if retain is not None else None
        if self.destination.is_contiguous():
            self._out = self.destination.view(-1)
            self._staged = False
        else:
            self._out = torch.empty(self.numel, dtype=self.destination.dtype, device=self.device)
            self._staged = True
        self.chunk_elements = chunk_elements(self.device)
        self._mask_buffer: Tensor | None = None

    def conflict_mask(self, forget: Tensor, retain: Tensor) -> Tensor:
        """:func:`_conflict_mask` of one chunk, computed in one buffer reused by every chunk of this pair.

        The mask is overwritten by the next chunk's: read it (or copy it) before asking again.
        """
        if self._mask_buffer is None:
            length = min(self.numel, self.chunk_elements)
            self._mask_buffer = torch.empty(length, dtype=self.compute_dtype, device=self.device)
        return _conflict_mask(forget, retain, self._mask_buffer[: forget.numel()])

    def _read(self, flat: Tensor | None, start: int, stop: int) -> Tensor:
        if flat is None:
            return torch.zeros(stop - start, dtype=self.compute_dtype, device=self.device)
        return flat[start:stop].to(self.compute_dtype)  # a view when no cast is needed

    def chunks(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield (forget chunk, retain chunk, output slice); float32 chunks must not be modified."""
        for start in range(0, self.numel, self.chunk_elements):
            stop = min(start + self.chunk_elements, self.numel)
            yield (
                self._read(self._forget, start, stop),
                self._read(self._retain, start, stop),
                self._out[start:stop],
            )

    def finish(self) -> Tensor:
        if self._staged:
            self.destination.copy_(self._out.view(self.destination.shape))
        return self.destination


class Synthesizer(ABC):
    """Combines a forget gradient g_f and a retain gradient g_r into one update (retention first).

    Weights: ``gamma`` scales the forget side, ``alpha`` the retain side; both finite and >= 0.

    Subclasses declare their options as a nested ``class Options(SynthesizerOptions)`` (pydantic:
    types, defaults and ranges in one place; unknown keys are rejected), set
    ``needs_pair_sums = True`` when the update depends on global per-tensor sums (then implement
    :meth:`prepare`), and implement :meth:`update_chunk`. Options are read as ``self.options.eps``.

    ``combine`` consumes its inputs: ``update[i]`` is written into the storage of ``retain_grads[i]``
    (or of ``forget_grads[i]`` when the retain gradient is None), so callers must not read either
    list afterwards.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SynthesizerOptions]] = SynthesizerOptions
    needs_pair_sums: ClassVar[bool] = False
    """True when the update needs globally reduced per-tensor sums first (a separate first pass)."""
    uses_conflict_mask: ClassVar[bool] = False
    """True when :meth:`update_chunk` reads the conflict mask (otherwise it may receive None)."""
    element_counters: ClassVar[tuple[str, ...]] = ()
    """Names of per-element counts returned by :meth:`update_chunk`, reported as fractions."""

    def __init__(self, alpha: float = 1.0, gamma: float = 1.0, **options: Any) -> None:
        owner = f"synthesizer {self.name!r}"
        weights = parse_options(owner, _Weights, {"alpha": alpha, "gamma": gamma})
        self.alpha: float = weights.alpha
        self.gamma: float = weights.gamma
        self.options = parse_options(owner, self.Options, options)

    @property
    def settings(self) -> dict[str, Any]:
        """The validated options as plain data (for logs and reprs)."""
        return self.options.model_dump()

    def __repr__(self) -> str:
        extras = "".join(f", {key}={value!r}" for key, value in self.settings.items())
        return f"{type(self).__name__}(name={self.name!r}, alpha={self.alpha}, gamma={self.gamma}{extras})"

    # -- strategy hooks -------------------------------------------------------------------------

    def prepare(self, sums: PairSums) -> tuple[list[Any], dict[str, float]]:
        """Per-tensor coefficients (one item per entry) and extra stats from the reduced pair sums.

        Called only when ``needs_pair_sums``; the same on every rank because ``sums`` is reduced.
        """
        raise NotImplementedError(
            f"{type(self).__name__} sets needs_pair_sums but does not implement prepare"
        )

    @abstractmethod
    def update_chunk(
        self, forget: Tensor, retain: Tensor, conflict: Tensor | None, coefficient: Any
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The float32 update of one chunk, and one 0-dim count per name in ``element_counters``.

        ``forget``/``retain`` are float32 chunks that may be views of the caller's gradients: never
        modify them in place. ``conflict`` is the strict sign-conflict mask as float32 0/1 (None
        when the strategy
        does not set ``uses_conflict_mask`` and it was not needed anyway); ``coefficient`` is this
        tensor's item from :meth:`prepare` (None without ``needs_pair_sums``).
        """

    # -- the shared driver ----------------------------------------------------------------------

    def combine(
        self,
        forget_grads: Sequence[Tensor | None],
        retain_grads: Sequence[Tensor | None],
        all_reduce_fn: AllReduceFn | None = None,
    ) -> tuple[list[Tensor | None], dict[str, float]]:
        """Return ``(update, stats)``; see the class docstring for storage reuse and sharding."""
        pairs = _validated_pairs(forget_grads, retain_grads)
        present = [p for pair in pairs for p in pair if p is not None]
        device = present[0].device if present else torch.device("cpu")
        with torch.no_grad():
            stats: dict[str, float] = {}
            coefficients: list[Any] = [None] * len(pairs)
            sums: PairSums | None = None
            if self.needs_pair_sums:
                matrix = torch.zeros((len(pairs), _PAIR_COLUMNS), dtype=torch.float32, device=device)
                for index, (forget, retain) in enumerate(pairs):
                    if forget is not None or retain is not None:
                        row = self._pair_row(_Pair(forget, retain))
                        matrix[index] = row.to(device)
                sums = PairSums.from_matrix(_reduce(matrix.reshape(-1), all_reduce_fn).view(matrix.shape))
                coefficients, extra = self.prepare(sums)
                stats.update(extra)
            update, local = self._write_updates(pairs, coefficients, fused=sums is None, device=device)
            totals = _reduce(local, all_reduce_fn).double().cpu().tolist()
        return update, self._stats(sums, totals, stats)

    def _pair_row(self, pair: _Pair) -> Tensor:
        """Phase-1 partial sums of one tensor: [||f||^2, ||r||^2, <f,r>, conflicts, numel]."""
        row = torch.zeros(_PAIR_COLUMNS, dtype=torch.float32, device=pair.device)
        row[_NUMEL] = float(pair.numel)
        for forget, retain, _ in pair.chunks():
            conflicts = pair.conflict_mask(forget, retain).sum()
            row[:_NUMEL] += torch.stack(
                [torch.dot(forget, forget), torch.dot(retain, retain), torch.dot(forget, retain), conflicts]
            )
        return row

    def _write_updates(
        self,
        pairs: list[tuple[Tensor | None, Tensor | None]],
        coefficients: list[Any],
        fused: bool,
        device: torch.device,
    ) -> tuple[list[Tensor | None], Tensor]:
        """Write every update in place and return the local partial sums of the final reduction.

        Vector layout: [||u||^2, <u,r>, <u,f>, *element_counters] and, when ``fused`` (no separate
        first pass), the phase-1 totals [||f||^2, ||r||^2, <f,r>, conflicts, numel] after them.
        """
        width = 3 + len(self.element_counters) + (_PAIR_COLUMNS if fused else 0)
        local = torch.zeros(width, dtype=torch.float32, device=device)
        update: list[Tensor | None] = []
        want_mask = fused or self.uses_conflict_mask
        for (forget, retain), coefficient in zip(pairs, coefficients, strict=True):
            if forget is None and retain is None:
                update.append(None)
                continue
            pair = _Pair(forget, retain)
            acc = torch.zeros(width, dtype=torch.float32, device=pair.device)
            for forget_chunk, retain_chunk, out in pair.chunks():
                conflict = pair.conflict_mask(forget_chunk, retain_chunk) if want_mask else None
                chunk_update, counts = self.update_chunk(forget_chunk, retain_chunk, conflict, coefficient)
                parts = [
                    torch.dot(chunk_update, chunk_update),
                    torch.dot(chunk_update, retain_chunk),
                    torch.dot(chunk_update, forget_chunk),
                    *(count.to(device=chunk_update.device, dtype=torch.float32) for count in counts),
                ]
                if fused:
                    parts += [
                        torch.dot(forget_chunk, forget_chunk),
                        torch.dot(retain_chunk, retain_chunk),
                        torch.dot(forget_chunk, retain_chunk),
                        conflict.sum(),
                    ]
                acc[: len(parts)] += torch.stack(parts)
                out.copy_(chunk_update)  # after every read of this chunk: out may alias retain_chunk
            if fused:
                acc[-1] = float(pair.numel)
            local += acc.to(device)
            update.append(pair.finish())
        return update, local

    def _stats(self, sums: PairSums | None, totals: list[float], extra: dict[str, float]) -> dict[str, float]:
        update_sq, update_retain, update_forget = totals[:3]
        counts = totals[3 : 3 + len(self.element_counters)]
        if sums is None:
            forget_sq, retain_sq, dot, conflicts, numel = totals[3 + len(self.element_counters) :]
        else:
            forget_sq, retain_sq, dot = sums.total_forget_sq, sums.total_retain_sq, sums.total_dot
            conflicts, numel = math.fsum(sums.conflicts), math.fsum(sums.numel)
        stats = {
            "conflict_fraction": _fraction(conflicts, numel),
            "cos_forget_retain": _cos(dot, forget_sq, retain_sq),
            "cos_update_retain": _cos(update_retain, update_sq, retain_sq),
            "cos_update_forget": _cos(update_forget, update_sq, forget_sq),
            "norm_forget": math.sqrt(max(forget_sq, 0.0)),
            "norm_retain": math.sqrt(max(retain_sq, 0.0)),
            "norm_update": math.sqrt(max(update_sq, 0.0)),
        }
        stats.update(
            {name: _fraction(count, numel) for name, count in zip(self.element_counters, counts, strict=True)}
        )
        stats.update(extra)
        return stats
