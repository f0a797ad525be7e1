"""Shared pieces of all objectives: batch checks, masks, shifted log-probs, the objective base class.

Labels come only from the attention mask and the optional ``loss_mask`` — never from the pad-token
id, because pad and eos are the same token in SmolLM2/Llama-style tokenizers and an eos inside the
real text must still be scored.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from retainfirst.errors import RetainFirstError
from retainfirst.validation import Options, parse_options

# Rows of [N, vocab] logits upcast to float32 at a time: bounds the float32 temporaries of bf16 models.
LOGSUMEXP_CHUNK_ROWS = 1024


# ----------------------------------------------------------------------------------------------
# Batches and masks


def check_batch(batch: dict[str, Tensor]) -> None:
    """Fail early, with a fixable message, on a batch that does not follow the collate contract."""
    if not isinstance(batch, dict) or "input_ids" not in batch or "attention_mask" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise RetainFirstError(f"an objective batch needs 'input_ids' and 'attention_mask' (got {keys})")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        shape = tuple(input_ids.shape)
        raise RetainFirstError(f"batch 'input_ids' must be [batch, tokens], got shape {shape}")
    for key in ("attention_mask", "loss_mask"):
        if key in batch and batch[key] is not None and batch[key].shape != input_ids.shape:
            raise RetainFirstError(
                f"batch {key!r} has shape {tuple(batch[key].shape)} "
                f"but input_ids has {tuple(input_ids.shape)}; pad every field to the same length"
            )


def scored_mask(batch: dict[str, Tensor]) -> Tensor:
    """Bool [B, T]: tokens the loss scores = attention mask AND the optional loss mask (unshifted)."""
    check_batch(batch)
    mask = batch["attention_mask"].bool()
    loss_mask = batch.get("loss_mask")
    if loss_mask is not None:
        mask = mask & loss_mask.bool()
    return mask


def predicted_mask(batch: dict[str, Tensor]) -> Tensor:
    """Bool [B, T-1]: which next-token predictions are scored (the *predicted* token's mask decides)."""
    return scored_mask(batch)[:, 1:]


def require_tokens(count: Tensor | int, what: str) -> None:
    """Raise when a batch has nothing to score; a silent 0/0 would poison the run with NaN."""
    if int(count) == 0:
        raise RetainFirstError(
            f"{what}: the batch has no scored tokens (attention_mask & loss_mask are empty after the "
            "one-token shift); check that examples have answer tokens and are not truncated away"
        )


# ----------------------------------------------------------------------------------------------
# Log-probabilities


def _at_least_float32(tensor: Tensor) -> Tensor:
    """Upcast half precisions to float32; leave float32/float64 alone."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


class _Float32LogSumExp(torch.autograd.Function):
    """logsumexp over the last dim computed in float32 a chunk of rows at a time, forward and backward.

    Plain ``torch.logsumexp(x.float())`` would keep the float32 copy of all [N, V] logits alive for
    the backward; this saves only the input (in its own dtype) and the [N] result, and recomputes
    the softmax chunk by chunk in the backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:  # type: ignore[override]
        result = torch.cat(
            [
                torch.logsumexp(_at_least_float32(chunk), dim=-1)
                for chunk in logits.split(LOGSUMEXP_CHUNK_ROWS)
            ]
        )
        ctx.save_for_backward(logits, result)
        return result

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        logits, result = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], LOGSUMEXP_CHUNK_ROWS):
            rows = slice(start, start + LOGSUMEXP_CHUNK_ROWS)
            softmax = torch.exp(_at_least_float32(logits[rows]) - result[rows, None])
            grad[rows] = (softmax * grad_output[rows, None]).to(logits.dtype)
        return grad


def _selected_token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) for rows of ``logits`` [N, V], in float32: gather, then logsumexp.

    Only the target logit is gathered, and the float32 upcast for the log-normaliser happens a
    chunk of rows at a time, so a bf16 model never holds a full float32 log-softmax.
    """
    target_logits = _at_least_float32(logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    return target_logits - _Float32LogSumExp.apply(logits)


def sequence_logprobs(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-prob of the scored tokens of each sequence, and how many tokens were scored.

    ``logits`` [B, T, V] from the model on ``input_ids`` [B, T]; ``loss_mask`` [B, T] (unshifted,
    1 = token scored). Logits at t predict token t+1, so the mask of token t+1 decides. Returns
    ``(logp_sum [B], n_tokens [B] long)``, the sums in float32 (float64 for float64 logits);
    sequences with no scored token get 0 and 0.
    """
    if logits.shape[:2] != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise RetainFirstError(
            f"sequence_logprobs: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)} and "
            f"loss_mask {tuple(loss_mask.shape)} disagree on [batch, tokens]"
        )
    mask = loss_mask[:, 1:].to(device=logits.device, dtype=torch.bool)
    input_ids = input_ids.to(logits.device)
    rows, cols = mask.nonzero(as_tuple=True)
    token_logprobs = _selected_token_logprobs(logits[:, :-1][rows, cols], input_ids[:, 1:][rows, cols])
    sums = torch.zeros(input_ids.shape[0], dtype=token_logprobs.dtype, device=logits.device)
    sums = sums.index_add(0, rows, token_logprobs)
    return sums, mask.sum(dim=1)


def token_nll(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over all scored tokens of the batch (float32 scalar)."""
    sums, counts = sequence_logprobs(logits, input_ids, loss_mask)
    total = counts.sum()
    require_tokens(total, "token_nll")
    return -sums.sum() / total


def masked_mse(hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Float32 mean squared error over scored positions and hidden dims (``target`` broadcasts)."""
    squared = (hidden.float() - target.to(hidden.device).float()).pow(2).sum(dim=-1)  # [B, T]
    mask = mask.to(device=squared.device, dtype=squared.dtype)
    return (squared * mask).sum() / (mask.sum() * hidden.shape[-1])


def model_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Forward pass that returns the logits only (no KV cache: training never reuses it)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


# ----------------------------------------------------------------------------------------------
# The objective base class and its options


class ObjectiveOptions(Options):
    """Options of an objective: subclass it as ``Options`` inside the objective (none by default)."""


class Objective:
    """A loss computed from ``(model, batch, reference)``; forget and retain objectives share this shape.

    Subclasses set ``kind`` ("forget" or "retain": which registry, and which side of the update,
    an entry point's class belongs to) and ``needs_reference``, declare their keyword options as a
    nested ``class Options(ObjectiveOptions)`` (pydantic: types, defaults and ranges in one place),
    and implement :meth:`compute`. Options are read as attributes (``self.beta``). The loss is
    returned *as minimised* (gradient ascent returns -NLL). ``last_metrics`` holds detached scalars
    of the last call (floats on read, so logging costs one sync only when an engine asks).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "forget" | "retain"
    needs_reference: ClassVar[bool] = False
    # True for the retain objective ``none``: the engine then runs no retain pass at all.
    skips_pass: ClassVar[bool] = False
    Options: ClassVar[type[ObjectiveOptions]] = ObjectiveOptions

    def __init__(self, **options: Any) -> None:
        self.options = parse_options(f"{self.kind} objective {self.name!r}".lstrip(), self.Options, options)
        self._metrics: dict[str, Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        """Options read as attributes: ``self.beta`` is ``self.options.beta``."""
        options = self.__dict__.get("options")
        if options is not None and name in type(options).model_fields:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # --- hooks an engine calls -------------------------------------------------------------
    @property
    def trainable_patterns(self) -> list[str] | None:
        """Regexes on parameter names this objective trains by default; None = the engine decides."""
        return None

    def setup(self, model: nn.Module, seed: int = 0) -> None:
        """Prepare model-dependent state (e.g. RMU's control vector). No-op by default."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint so a resumed run is identical (empty for stateless objectives)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if state:
            raise RetainFirstError(f"objective {self.name!r} has no state, got keys {sorted(state)}")

    def config(self) -> dict[str, Any]:
        """The validated options (for train_config.json and logs)."""
        return self.options.model_dump()

    @property
    def last_metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in self._metrics.items()}

    # --- the loss ------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Tensor], reference: Any = None) -> Tensor:
        """Scalar loss (0-d, connected to the graph). ``reference`` is required iff ``needs_reference``."""
        check_batch(batch)
        if self.needs_reference and reference is None:
            raise RetainFirstError(
                f"{self.kind} objective {self.name!r} needs a reference model; build one with "
                "retainfirst.objectives.make_reference(model) before training"
            )
        self._metrics = {}
        return self.compute(model, batch, reference)

    __call__ = loss

    def compute(self, model: nn.Module, batch: dict[str, Tensor], reference: Any) -> Tensor:
        raise NotImplementedError

    def _record(self, **metrics: Tensor) -> None:
        self._metrics.update({key: value.detach() for key, value in metrics.items()})

    def __repr__(self) -> str:
        kwargs = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({kwargs})"
