"""Hugging Face ``Trainer`` integration: two-pass forget/retain steps combined by a synthesizer.

```python
from retainfirst.integrations.transformers import UnlearningTrainer, UnlearningTrainerMixin

trainer = UnlearningTrainer(model=model, args=training_args, train_dataset=pairs,
                            synthesizer="sago", forget_loss="npo", retain_loss="nll")
class MyTrainer(UnlearningTrainerMixin, SomeTrainerSubclass): ...   # keeps that class's features
```

Each training example is a pair ``{"forget": example, "retain": example}`` (open-unlearning's
ForgetRetainDataset yields these; :class:`ForgetRetainDataset` and :class:`ForgetRetainCollator`
build them from retainfirst examples). One optimizer step is the engine's step
(:mod:`retainfirst.engine.loop`), placed in the Trainer's own loop:

1. ``training_step`` (every micro-batch): forget loss -> backward -> its gradients move into a
   stash; retain loss -> backward (accumulating in ``param.grad``). Both backwards run under
   ``no_sync``; each loss is divided by the micro-batches of the accumulation window.
2. ``training_step`` of the window's last micro-batch (the Trainer's ``sync_gradients`` flag):
   average both gradient lists across DDP ranks, synthesize the update ``u`` and write it into
   ``param.grad``.
3. The Trainer then does what it always does: clip (so ``max_grad_norm`` applies to ``u``, as in
   the engine), optimizer step, LR schedule, ``zero_grad``, log, save.

Why ``training_step`` and not an optimizer-step hook: the Trainer clips *before*
``on_pre_optimizer_step`` and before ``optimizer.step()``, so a callback or an optimizer wrapper
would clip ``g_f + g_r`` instead of ``u`` (and a wrapper would also have to undo the GradScaler).
Synthesizing at the end of the last micro-batch's ``training_step`` needs no private hook, and
the stash is empty at every optimizer-step boundary, so Trainer checkpoints and
``resume_from_checkpoint`` need no extra state.

Supported: single process, DDP (``torchrun``), gradient accumulation, bf16, gradient
checkpointing, PEFT models, every ``report_to`` tracker (the losses and synthesis stats are added
to the Trainer's own log lines). Not supported: fp16 (the GradScaler unscales inside the
Trainer's clip, after synthesis), DeepSpeed and FSDP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import Trainer

from retainfirst.data import collate
from retainfirst.engine.batches import ExampleStream
from retainfirst.engine.grads import Grads, accumulate, mean_across_ranks, put_grads, take_grads, write_update
from retainfirst.engine.model_setup import select_trainable
from retainfirst.engine.optim import Float32AdamW
from retainfirst.errors import NonFiniteError, RetainFirstError
from retainfirst.objectives import (
    AdapterDisabledReference,
    FrozenCopyReference,
    Reference,
    get_forget_objective,
    get_retain_objective,
    is_peft_model,
    make_reference,
)
from retainfirst.synthesis import Synthesizer, get_synthesizer

__all__ = [
    "ForgetRetainCollator",
    "ForgetRetainDataset",
    "FunctionObjective",
    "UnlearningTrainer",
    "UnlearningTrainerMixin",
]

LossFunction = Callable[[nn.Module, dict[str, Tensor]], Tensor]
REFERENCE_CHOICES = ("auto", "copy", "adapter")
FORGET, RETAIN = "forget", "retain"
IGNORE_INDEX = -100  # HF label value for "not scored"
# TrainingArguments.optim values that mean torch's AdamW (the default is one of them)
TORCH_ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused")
HALF_PRECISION = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Data: forget/retain pairs


class ForgetRetainDataset(Dataset):
    """Pairs ``{"forget": example, "retain": example}`` in the engine's order.

    Item ``i`` holds the ``i``-th example of each side's seeded stream
    (:class:`retainfirst.engine.batches.ExampleStream`, a fresh permutation per epoch), so with
    ``train_sampling_strategy="sequential"`` and one process the Trainer sees exactly the batches
    ``retainfirst.engine.unlearn`` would (equal forget and retain batch sizes). ``length``
    defaults to the larger side (one epoch of it).
    """

    def __init__(
        self,
        forget_examples: Sequence[Mapping[str, Tensor]],
        retain_examples: Sequence[Mapping[str, Tensor]],
        seed: int = 0,
        length: int | None = None,
    ) -> None:
        if not forget_examples or not retain_examples:
            raise RetainFirstError("ForgetRetainDataset needs at least one forget and one retain example")
        length = max(len(forget_examples), len(retain_examples)) if length is None else length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise RetainFirstError(f"ForgetRetainDataset length must be a positive integer, got {length!r}")
        self.forget_examples = forget_examples
        self.retain_examples = retain_examples
        self.forget_order = ExampleStream(len(forget_examples), seed, FORGET).take(length)
        self.retain_order = ExampleStream(len(retain_examples), seed, RETAIN).take(length)

    def __len__(self) -> int:
        return len(self.forget_order)

    def __getitem__(self, index: int) -> dict[str, Mapping[str, Tensor]]:
        return {
            FORGET: self.forget_examples[self.forget_order[index]],
            RETAIN: self.retain_examples[self.retain_order[index]],
        }


class ForgetRetainCollator:
    """Collates a list of pairs into ``{"forget": batch, "retain": batch}``.

    Each side goes through ``collate_fn`` (default: :func:`retainfirst.data.collate`, right padding
    with ``pad_token_id`` plus ``attention_mask`` and ``loss_mask``).
    """

    def __init__(
        self,
        pad_token_id: int | None = None,
        collate_fn: Callable[[list[Any]], dict[str, Tensor]] | None = None,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.collate_fn = collate_fn

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, dict[str, Tensor]]:
        for number, feature in enumerate(features, start=1):
            if not isinstance(feature, Mapping) or FORGET not in feature or RETAIN not in feature:
                got = sorted(feature) if isinstance(feature, Mapping) else type(feature).__name__
                raise RetainFirstError(
                    f"ForgetRetainCollator: example {number} must be a dict with 'forget' and 'retain', "
                    f"got {got}"
                )
        sides = {}
        for side in (FORGET, RETAIN):
            examples = [feature[side] for feature in features]
            sides[side] = (
                self.collate_fn(examples) if self.collate_fn else collate(examples, self.pad_token_id)
            )
        return sides


# ----------------------------------------------------------------------------------------------
# Losses


class FunctionObjective:
    """A plain ``loss_fn(model, batch) -> scalar`` behaving like a retainfirst objective.

    Lets an existing unlearning script keep its own loss (it receives the batch unchanged, e.g.
    with ``labels``); a loss that needs a reference model closes over its own.
    """

    needs_reference = False
    trainable_patterns = None

    def __init__(self, loss_fn: LossFunction, kind: str) -> None:
        self.loss_fn = loss_fn
        self.kind = kind
        self.name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        self.last_metrics: dict[str, float] = {}
        self.takes_raw_batch = True

    def setup(self, model: nn.Module, seed: int = 0) -> None:
        """Nothing to prepare."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor], reference: Any = None) -> Tensor:
        loss = self.loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise RetainFirstError(
                f"the {self.kind} loss function {self.name!r} must return a scalar tensor, "
                f"got {type(loss).__name__}"
            )
        return loss.reshape(())


def resolve_objective(spec: Any, options: Mapping[str, Any] | None, kind: str) -> Any:
    """A registry name, an objective instance (has ``.loss``) or a ``(model, batch)`` callable."""
    options = dict(options or {})
    if isinstance(spec, str):
        build = get_forget_objective if kind == FORGET else get_retain_objective
        return build(spec, **options)
    if options:
        raise RetainFirstError(f"{kind}_kwargs only apply to a {kind} loss given by name, not to {spec!r}")
    if hasattr(spec, "loss") and hasattr(spec, "needs_reference"):
        return spec
    if callable(spec):
        return FunctionObjective(spec, kind)
    raise RetainFirstError(
        f"{kind}_loss must be an objective name (e.g. 'npo', 'nll'), an objective or a callable "
        f"(model, batch) -> loss, got {type(spec).__name__}"
    )


def objective_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch as retainfirst objectives read it: ``loss_mask`` from HF ``labels`` (!= -100) if absent.

    HF labels are unshifted copies of ``input_ids`` with -100 on unscored tokens, which is exactly
    retainfirst's unshifted ``loss_mask``.
    """
    batch = dict(batch)
    if batch.get("loss_mask") is None and isinstance(batch.get("labels"), Tensor):
        batch["loss_mask"] = (batch["labels"] != IGNORE_INDEX).long()
    return batch


def build_reference(model: nn.Module, reference: Any) -> Reference:
    """``"auto"`` (adapters off for PEFT, else a frozen copy), ``"copy"``, ``"adapter"`` or a Reference."""
    if isinstance(reference, str):
        if reference not in REFERENCE_CHOICES:
            raise RetainFirstError(
                f"reference must be one of {list(REFERENCE_CHOICES)} or a Reference object, got {reference!r}"
            )
        if reference == "copy":
            return FrozenCopyReference(model)
        if reference == "adapter":
            return AdapterDisabledReference(model)
        return make_reference(model)
    if not isinstance(reference, Reference):
        raise RetainFirstError(
            f"reference must be one of {list(REFERENCE_CHOICES)} or an object with forward() and "
            f"layer_output() (retainfirst.objectives.Reference), got {type(reference).__name__}"
        )
    return reference


# ----------------------------------------------------------------------------------------------
# The Trainer


class UnlearningTrainerMixin:
    """Turns a ``transformers.Trainer`` (sub)class into a two-pass unlearning trainer.

    Use as ``class MyTrainer(UnlearningTrainerMixin, SomeTrainer)``; the mixin must come first.
    Keyword arguments, on top of the Trainer's:

    - ``synthesizer``: registry name (``"sago"``, ``"sum"``, ``"pcgrad"``, ...) or a Synthesizer;
      for a name, ``alpha`` (retain weight, default 1), ``gamma`` (forget weight, default 1) and
      ``synthesizer_options``. The kwargs ``alpha``/``gamma`` are consumed here, not passed on to
      the Trainer subclass (whose own loss is not used for training).
    - ``forget_loss`` / ``retain_loss``: objective name (with ``forget_kwargs`` / ``retain_kwargs``),
      an objective instance, or a callable ``(model, batch) -> loss``; ``retain_loss=None`` runs
      forget-only. Objectives given by name get ``loss_mask`` from ``labels`` when the batch has no
      ``loss_mask`` (open-unlearning batches).
    - ``reference``: ``"auto"`` (built only if an objective needs one: adapters disabled for a
      PEFT model, else a frozen copy of the model *as passed in* -- also when resuming, pass the
      original model), ``"copy"``, ``"adapter"`` or a ready Reference.
    - ``trainable_patterns``: regexes on parameter names; only matches train (RMU, for example,
      wants ``forget.trainable_patterns``). None keeps the model's ``requires_grad`` as it is.

    Optimizer: when ``args.optim`` is torch's AdamW (``"adamw_torch"`` or ``"adamw_torch_fused"``,
    the Trainer's defaults), no optimizer was passed in and a trainable parameter is bf16/fp16 (a
    model loaded in half precision), the optimizer is :class:`retainfirst.engine.optim.Float32AdamW`,
    the engine's own: torch's AdamW keeps its moments in the parameter dtype, where ``0.999 * v``
    rounds back to ``v`` and the second moment never decays. Same hyperparameters and weight-decay
    groups; for float32/float64 parameters it gives exactly torch's AdamW, which is why other
    models keep the Trainer's own optimizer (and its fused kernel). Pass ``optimizers=`` or
    ``optimizer_cls_and_kwargs=`` to choose another.

    Without a ``data_collator`` a :class:`ForgetRetainCollator` is used. The Trainer's logged
    ``loss`` is ``forget_loss + retain_loss``; both are logged separately too, with the
    synthesizer's stats (``conflict_fraction``, ``cos_update_retain``, ...) and the objectives'
    metrics (``forget/nll``, ...), averaged over the steps of each log line. Evaluation stays the
    Trainer's (or the subclass's) own ``compute_loss``/``evaluate``.
    """

    def __init__(
        self,
        *args: Any,
        synthesizer: str | Synthesizer = "sago",
        alpha: float | None = None,
        gamma: float | None = None,
        synthesizer_options: Mapping[str, Any] | None = None,
        forget_loss: Any = "ga",
        forget_kwargs: Mapping[str, Any] | None = None,
        retain_loss: Any = "nll",
        retain_kwargs: Mapping[str, Any] | None = None,
        reference: Any = "auto",
        trainable_patterns: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        # everything that can be wrong without a model is checked before the Trainer's heavy init
        if isinstance(synthesizer, str):
            synthesizer = get_synthesizer(
                synthesizer,
                1.0 if alpha is None else alpha,
                1.0 if gamma is None else gamma,
                **dict(synthesizer_options or {}),
            )
        elif synthesizer_options or alpha is not None or gamma is not None:
            raise RetainFirstError(
                "alpha, gamma and synthesizer_options only apply to a synthesizer given by name; "
                "set them on the synthesizer object instead"
            )
        if not hasattr(synthesizer, "combine"):
            raise RetainFirstError(
                f"synthesizer must be a name or an object with combine(), got {type(synthesizer).__name__}"
            )
        self.synthesizer = synthesizer
        self.forget_objective = resolve_objective(forget_loss, forget_kwargs, FORGET)
        self.retain_objective = (
            None if retain_loss is None else resolve_objective(retain_loss, retain_kwargs, RETAIN)
        )
        if kwargs.get("data_collator") is None and len(args) < 3:
            processing_class = kwargs.get("processing_class")
            kwargs["data_collator"] = ForgetRetainCollator(getattr(processing_class, "pad_token_id", None))

        super().__init__(*args, **kwargs)

        self._check_supported()
        model = self.model
        if trainable_patterns is not None:
            select_trainable(model, list(trainable_patterns), lora=is_peft_model(model))
        for objective in self._objectives():
            objective.setup(model, seed=self.args.seed)
        needs_reference = any(objective.needs_reference for objective in self._objectives())
        if isinstance(reference, str) and reference == "auto" and not needs_reference:
            self.reference = None
        else:
            self.reference = None if reference is None else build_reference(model, reference)
        if needs_reference and self.reference is None:
            raise RetainFirstError("the forget/retain loss needs a reference model; pass reference='auto'")
        self._keep_pair_columns()
        self._reset_unlearning_state()
        self._log_sums: dict[str, float] = {}
        self._log_count = 0
        self.last_unlearning_metrics: dict[str, float] = {}

    # ---- setup ---------------------------------------------------------------------------------
    def _objectives(self) -> list[Any]:
        return [o for o in (self.forget_objective, self.retain_objective) if o is not None]

    def _check_supported(self) -> None:
        """Refuse setups whose gradients the two-pass step cannot see as plain, unscaled tensors."""
        if self.args.fp16:
            raise RetainFirstError(
                "fp16 is not supported by the unlearning trainer (gradients are still loss-scaled when the "
                "update is synthesized); use bf16=True or full precision"
            )
        if getattr(self, "is_deepspeed_enabled", False):
            raise RetainFirstError(
                "DeepSpeed is not supported by the unlearning trainer; use DDP (torchrun) or FSDP2 "
                "(configs/accelerate/fsdp2.yaml, see docs/deepspeed.md)"
            )
        if getattr(self, "is_fsdp_enabled", False):
            raise RetainFirstError("FSDP is not supported by the unlearning trainer; use DDP (torchrun)")

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, except Float32AdamW for torch's AdamW on half-precision weights."""
        if not (
            self.optimizer is None
            and getattr(self, "optimizer_cls_and_kwargs", None) is None
            and str(getattr(self.args.optim, "value", self.args.optim)) in TORCH_ADAMW_NAMES
            and any(
                p.requires_grad and p.dtype in HALF_PRECISION
                for p in (self.model if model is None else model).parameters()
            )
        ):
            return super().create_optimizer(model)
        args = self.args
        adamw = {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
        }
        self.optimizer_cls_and_kwargs = (Float32AdamW, adamw)  # the Trainer still builds the decay groups
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = None

    def _keep_pair_columns(self) -> None:
        """``remove_unused_columns`` would drop "forget"/"retain" (not forward() arguments): keep them."""
        if not self.args.remove_unused_columns or not hasattr(self, "_set_signature_columns_if_needed"):
            return
        self._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, FORGET, RETAIN]

    def _reset_unlearning_state(self) -> None:
        self._forget_stash: Grads | None = None
        self._loss_sums: Tensor | None = None
        self._micro_steps = 0

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._reset_unlearning_state()  # a crashed train() call may have left a half window behind
        return super().train(*args, **kwargs)

    # ---- one micro-batch -----------------------------------------------------------------------
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Forget pass then retain pass; on the window's last micro-batch, synthesize the update."""
        if not isinstance(inputs, Mapping) or FORGET not in inputs:
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise RetainFirstError(
                "the unlearning trainer needs batches {'forget': batch, 'retain': batch} "
                f"(use ForgetRetainDataset/ForgetRetainCollator), got keys {got}"
            )
        if self.retain_objective is not None and inputs.get(RETAIN) is None:
            raise RetainFirstError("the batch has no 'retain' part; pass retain_loss=None for forget-only")
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        params = [p for p in self.accelerator.unwrap_model(model).parameters() if p.requires_grad]
        if self._forget_stash is None:
            self._forget_stash = [None] * len(params)
        scale = 1.0 / self.current_gradient_accumulation_steps  # as the engine: gradients are means

        retain_grads_so_far = take_grads(params)
        forget_loss = self._loss_and_backward(model, self.forget_objective, inputs[FORGET], scale)
        self._forget_stash = accumulate(self._forget_stash, take_grads(params))
        put_grads(params, retain_grads_so_far)
        losses = [forget_loss]
        if self.retain_objective is not None:
            losses.append(self._loss_and_backward(model, self.retain_objective, inputs[RETAIN], scale))
        step_losses = torch.stack(losses)
        self._loss_sums = step_losses if self._loss_sums is None else self._loss_sums + step_losses
        self._micro_steps += 1

        if self.accelerator.sync_gradients:  # the Trainer's last micro-batch before clip + step
            self._synthesize(params)
        return step_losses.sum() * scale

    def _loss_and_backward(self, model: nn.Module, objective: Any, batch: Any, scale: float) -> Tensor:
        """One loss, one backward without DDP sync; returns the detached float loss."""
        if not getattr(objective, "takes_raw_batch", False):
            batch = objective_batch(batch)
        with self.accelerator.no_sync(model):
            with self.compute_loss_context_manager(), self.accelerator.autocast():
                loss = objective.loss(model, batch, self.reference)
            self.accelerator.backward(loss * scale)
        return loss.detach().float()

    # ---- the accumulation boundary -------------------------------------------------------------
    def _synthesize(self, params: list[nn.Parameter]) -> None:
        """Mean over ranks, then ``u = synthesizer(g_f, g_r)`` into ``param.grad`` (clipped next)."""
        world = self.accelerator.num_processes
        forget_grads, retain_grads = self._forget_stash, take_grads(params)
        losses = self._loss_sums / self._micro_steps
        self._reset_unlearning_state()
        if world > 1:
            losses = self.accelerator.reduce(losses, reduction="mean")
            mean_across_ranks(forget_grads, world)
            mean_across_ranks(retain_grads, world)
        loss_values = losses.tolist()
        step = self.state.global_step + 1
        for which, value in zip((FORGET, RETAIN), loss_values, strict=False):
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"step {step}: the {which} loss is {value}; stopped before applying the step "
                    "(the last checkpoint is kept); lower the learning rate or check the data"
                )
        update, stats = self.synthesizer.combine(forget_grads, retain_grads, all_reduce_fn=None)
        del forget_grads, retain_grads
        for which, key in ((FORGET, "norm_forget"), (RETAIN, "norm_retain")):
            if not math.isfinite(stats.get(key, 0.0)):
                raise NonFiniteError(
                    f"step {step}: the {which} gradient is not finite ({key}={stats[key]}); stopped before "
                    "applying the step (the last checkpoint is kept)"
                )
        write_update(params, update)
        record = {"forget_loss": loss_values[0]}
        if self.retain_objective is not None:
            record["retain_loss"] = loss_values[1]
        record.update({key: float(value) for key, value in stats.items()})
        for objective in self._objectives():
            record.update({f"{objective.kind}/{k}": v for k, v in objective.last_metrics.items()})
        self.last_unlearning_metrics = record
        for key, value in record.items():
            self._log_sums[key] = self._log_sums.get(key, 0.0) + value
        self._log_count += 1

    # ---- logging and bookkeeping ---------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the means of the unlearning metrics since the last log line to the Trainer's training log."""
        if self._log_count and "loss" in logs and "learning_rate" in logs:
            logs = {**logs, **{key: value / self._log_count for key, value in self._log_sums.items()}}
            self._log_sums, self._log_count = {}, 0
        super().log(logs, *args, **kwargs)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """FLOPs of both passes (the Trainer's estimate looks for ``input_ids`` at the top level)."""
        if isinstance(inputs, Mapping) and FORGET in inputs:
            total = 0
            for side in (FORGET, RETAIN):  # a loop: zero-argument super() fails inside a generator
                if isinstance(inputs.get(side), Mapping):
                    total += super().floating_point_ops(inputs[side])
            return total
        return super().floating_point_ops(inputs)


class UnlearningTrainer(UnlearningTrainerMixin, Trainer):
    """``transformers.Trainer`` with retainfirst's two-pass step (see :class:`UnlearningTrainerMixin`)."""
