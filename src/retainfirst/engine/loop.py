"""The unlearning loop: two passes per micro-batch, one synthesized update per optimizer step.

:class:`Unlearner` reads top to bottom like one step of training:

1. :meth:`Unlearner.micro_step`: forward+backward of the forget loss, then move those gradients
   into a stash (the forget graph is freed before the retain forward runs); forward+backward of
   the retain loss (accumulating in ``param.grad``; skipped entirely for ``retain_loss: none``).
   ``accelerator.backward`` divides the losses by the accumulation steps, so the gradients are means.
2. :meth:`Unlearner.apply_update` at the accumulation boundary: average both gradient lists over
   processes, synthesize the update from (forget, retain), write it into ``param.grad``, clip,
   optimizer step, LR schedule step. With ``synthesis_space: update`` each gradient is clipped and
   preconditioned by its own Adam moments first and the synthesized direction is the step
   (:class:`~retainfirst.engine.optim.UpdateSpaceAdamW`). With ``log_step_cosines`` the actual
   weight change is measured against both gradients (engine/step_cosines.py).
3. :meth:`Unlearner.run`: log one metrics line per step (and to the ``report_to`` trackers, see
   engine/tracking.py), checkpoint when due
   (:meth:`Unlearner.state_dict` / :meth:`Unlearner.load_state_dict` hold everything a resume needs).

:func:`unlearn` is the public entry point; it builds an :class:`Unlearner` and runs it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from retainfirst.data import collate
from retainfirst.engine.batches import Example, ExampleStream, check_examples, context_limit, rank_slice
from retainfirst.engine.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    load_model_state,
    model_state,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from retainfirst.engine.config import RESUME_FREE_FIELDS, TrainConfig
from retainfirst.engine.fsdp import (
    load_full_model_state,
    load_sharded_optimizer_state,
    sharded_optimizer_state,
)
from retainfirst.engine.grads import (
    Grads,
    accumulate,
    all_reduce_sum,
    mean_across_ranks,
    put_grads,
    take_grads,
    to_local,
    write_update,
)
from retainfirst.engine.loss_scale import LossScale
from retainfirst.engine.metrics import MetricsWriter, truncate_after
from retainfirst.engine.model_setup import apply_lora, enable_gradient_checkpointing, select_trainable
from retainfirst.engine.optim import Float32AdamW, UpdateSpaceAdamW
from retainfirst.engine.step_cosines import StepCosines
from retainfirst.engine.tracking import flat_config, init_kwargs, scalars
from retainfirst.errors import NonFiniteError, RetainFirstError

# Synthesis stats that stay meaningful without a retain gradient (retain_loss none).
FORGET_ONLY_STATS = ("norm_forget", "norm_update", "cos_update_forget")
SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class UnlearnResult:
    model: nn.Module = field(repr=False)  # unwrapped (a PeftModel with LoRA unless merge_lora)
    steps_done: int
    metrics_path: Path
    final_checkpoint: Path | None
    stopped_early: bool = False  # a callback asked to stop before config.steps


# callback(step, model) -> metrics to log under ``eval/`` (``{"stop": True}`` ends training), or None
StepCallback = Callable[[int, nn.Module], dict[str, Any] | None]


def unlearn(
    model: nn.Module,
    tokenizer: Any,
    forget_examples: Sequence[Example],
    retain_examples: Sequence[Example],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    accelerator: Any = None,
    *,
    callback: StepCallback | None = None,
    eval_every: int = 0,
) -> UnlearnResult:
    """Run ``config.steps`` unlearning steps on ``model``; see the module docstring for one step.

    ``callback(step, model)`` runs on the main process after every ``eval_every``-th step (0: only
    after the last one) with the unwrapped model; its dict is logged in that step's metrics line
    under ``eval/<key>``, and ``{"stop": True}`` ends training after that step (checkpoint and final
    model saved as usual; a resumed stopped run trains no further).
    """
    unlearner = Unlearner(
        model, tokenizer, forget_examples, retain_examples, config, out_dir, resume, accelerator
    )
    return unlearner.run(callback=callback, eval_every=eval_every)


class Unlearner:
    """One unlearning run: everything is built and checked in ``__init__``, :meth:`run` trains."""

    stopped: bool = False  # set when a step callback asked to stop; kept in the checkpoint state

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        forget_examples: Sequence[Example],
        retain_examples: Sequence[Example],
        config: TrainConfig,
        out_dir: str | Path,
        resume: bool = False,
        accelerator: Any = None,
    ) -> None:
        from retainfirst.objectives import get_forget_objective, get_retain_objective
        from retainfirst.synthesis import get_synthesizer

        cfg = self.cfg = config
        cfg.validate()
        self.out_dir = Path(out_dir)
        self.tokenizer = tokenizer
        self.forget_examples, self.retain_examples = forget_examples, retain_examples
        self.tracker_dir = Path(cfg.tracker_dir) if cfg.tracker_dir else self.out_dir
        self.run_name = cfg.run_name or self.out_dir.resolve().name
        acc = self.accelerator = (
            accelerator if accelerator is not None else make_accelerator(cfg, self.tracker_dir)
        )
        check_accelerator(acc, cfg)
        self.is_fsdp = acc.distributed_type.value == "FSDP"
        self.world, self.rank = acc.num_processes, acc.process_index

        # ---- everything that can be wrong is checked before the model is touched ----------------
        limit = context_limit(model, cfg.max_length)
        check_examples(forget_examples, "forget", limit)
        check_examples(retain_examples, "retain", limit)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
        self.forget = get_forget_objective(cfg.forget_loss, **cfg.forget_kwargs)
        self.retain = get_retain_objective(cfg.retain_loss, **cfg.retain_kwargs)
        self.synthesizer = get_synthesizer(cfg.synthesizer, cfg.alpha, cfg.gamma, **cfg.synthesizer_options)
        self.checkpoints_dir = self.out_dir / "checkpoints"
        existing = latest_checkpoint(self.checkpoints_dir)
        if existing is not None and not resume:
            raise RetainFirstError(
                f"{self.out_dir} already holds checkpoints of a run; "
                "pass resume=True to continue it or use a new out_dir"
            )
        self.resume_from = existing if resume else None
        saved = self._read_checkpoint(self.resume_from) if self.resume_from is not None else None
        if saved is not None:
            check_same_run(saved, cfg, self.resume_from, self.world)

        model, trainable_names = self._setup_model(model)
        self._setup_optimizer(model, trainable_names)
        self.forget_stream = ExampleStream(len(forget_examples), cfg.seed, "forget")
        self.retain_stream = ExampleStream(len(retain_examples), cfg.seed, "retain")
        self.step = 0
        self.update_space = cfg.synthesis_space == "update"
        # DDP: no backward syncs; both gradient lists are averaged by hand at the boundary.
        # FSDP: every backward reduce-scatters (the gradients are sharded), no manual mean.
        self.manual_mean = self.world > 1 and not self.is_fsdp
        self.all_reduce_fn = all_reduce_sum if self.is_fsdp else None
        self.forget_grads: Grads = [None] * len(self.params)
        if saved is not None:
            self.load_state_dict(saved, source=self.resume_from)

    def _read_checkpoint(self, path: Path) -> dict[str, Any]:
        """Every rank reads its part of ``path``; if any rank cannot, all of them stop (none waits)."""
        error: RetainFirstError | None = None
        try:
            saved = read_checkpoint(path, self.rank)
        except RetainFirstError as exc:
            error = exc
        if self.world > 1:
            failed = torch.tensor([float(error is not None)], device=self.accelerator.device)
            failed_ranks = self.accelerator.gather(failed).nonzero().flatten().tolist()
            if failed_ranks and error is None:
                raise RetainFirstError(
                    f"cannot resume from {path}: process(es) {failed_ranks} could not read their part "
                    "(see their error)"
                )
        if error is not None:
            raise error
        return saved

    def _setup_model(self, model: nn.Module) -> tuple[nn.Module, list[str]]:
        """Seed, LoRA adapters, trainable set, checkpointing, objective setup, reference."""
        from retainfirst.objectives import make_reference

        cfg, acc = self.cfg, self.accelerator
        _set_seed(cfg.seed)
        self.lora = cfg.lora is not None
        if self.lora:
            if self.is_fsdp:
                raise RetainFirstError(
                    "lora with FSDP is not supported; use DDP (or full fine-tuning under FSDP)"
                )
            model = apply_lora(model, cfg.lora, cfg.seed)
        patterns = cfg.trainable_patterns
        if patterns is None and not self.lora:
            patterns = self.forget.trainable_patterns
        trainable_names = select_trainable(model, patterns, lora=self.lora)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model, lora=self.lora)
        model.to(acc.device)
        model.train()
        self.forget.setup(model, seed=cfg.seed)
        self.retain.setup(model, seed=cfg.seed)
        needs_reference = self.forget.needs_reference or self.retain.needs_reference
        self.reference = make_reference(model) if needs_reference else None  # the model as it came in
        return model, trainable_names

    def _setup_optimizer(self, model: nn.Module, trainable_names: list[str]) -> None:
        """Optimizer and LR schedule over the trainable parameters, then accelerate's prepare()."""
        from transformers import get_scheduler

        cfg, acc = self.cfg, self.accelerator

        named = dict(model.named_parameters())
        optimizer = build_optimizer([named[name] for name in trainable_names], cfg)
        # The scheduler is stepped by us once per optimizer step (accelerate's wrapper would step it
        # once per process), so it is built on the raw optimizer and not passed to prepare().
        self.scheduler = get_scheduler(
            SCHEDULER_NAMES[cfg.lr_schedule],
            optimizer=optimizer,
            num_warmup_steps=cfg.num_warmup_steps,
            num_training_steps=cfg.steps,
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.unwrapped = acc.unwrap_model(self.model)
        named = dict(self.unwrapped.named_parameters())  # FSDP2 swaps parameters for DTensors in prepare()
        self.params = [named[name] for name in trainable_names]
        self.loss_scale = LossScale(acc.scaler)

    # ---- checkpoint state: written and read back here only ---------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (``rng``: this process's). Under FSDP all ranks must call it."""
        full_state = self.accelerator.get_state_dict(self.model) if self.is_fsdp else None
        return {
            "model": model_state(self.unwrapped, self.lora, full_state),
            "rng": rng_state(),
            # FSDP: every rank keeps its own optimizer shard (engine/fsdp.py), the shared state none
            "optimizer_shard": (
                sharded_optimizer_state(self.optimizer, self.unwrapped) if self.is_fsdp else None
            ),
            "step": self.step,
            "optimizer": None if self.is_fsdp else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loss_scale": self.loss_scale.state_dict(),
            "forget_position": self.forget_stream.position,
            "retain_position": self.retain_stream.position,
            "forget_objective": self.forget.state_dict(),
            "retain_objective": self.retain.state_dict(),
            "num_processes": self.world,
            "config": self.cfg.to_dict(),
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any], source: Path | None = None) -> None:
        """Restore :meth:`state_dict`; a state that does not fit is a RetainFirstError naming ``source``."""
        where = source or Path("checkpoint")
        try:
            sharded = state.get("optimizer_shard") is not None
            if sharded != self.is_fsdp:
                raise RetainFirstError(
                    f"{where} was written by {'an FSDP' if sharded else 'a non-FSDP'} run; "
                    f"resume it {'under FSDP' if sharded else 'without FSDP'} with as many processes"
                )
            if self.is_fsdp:
                load_full_model_state(self.unwrapped, state["model"], where)
                load_sharded_optimizer_state(self.optimizer, self.unwrapped, state["optimizer_shard"], where)
            else:
                load_model_state(self.unwrapped, state["model"], self.lora, where)
                self.optimizer.load_state_dict(state["optimizer"])
            self.forget.load_state_dict(state["forget_objective"])
            self.retain.load_state_dict(state["retain_objective"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.loss_scale.load_state_dict(state["loss_scale"])
            self.forget_stream.position = int(state["forget_position"])
            self.retain_stream.position = int(state["retain_position"])
            self.step = int(state["step"])
            self.stopped = bool(state.get("stopped", False))
            set_rng_state(state["rng"])  # last, so nothing above consumes the restored streams
        except RetainFirstError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            where = source / "training_state.json" if source is not None else "the checkpoint state"
            raise RetainFirstError(
                f"{where} does not fit this run ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "resume from an earlier checkpoint or start over with --overwrite"
            ) from None

    # ---- one step ------------------------------------------------------------------------------
    def next_batch(
        self, stream: ExampleStream, examples: Sequence[Example], per_device: int
    ) -> dict[str, Tensor]:
        """This rank's share of the next global micro-batch of ``stream``."""
        indices = rank_slice(stream.take(per_device * self.world), self.rank, self.world)
        batch = collate([examples[i] for i in indices], self.pad_token_id)
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def grad_sync_off(self) -> contextlib.AbstractContextManager:
        return self.accelerator.no_sync(self.model) if self.manual_mean else contextlib.nullcontext()

    def micro_step(self) -> Tensor:
        """Forget pass into the stash, then retain pass into ``param.grad``; returns both losses."""
        cfg, acc = self.cfg, self.accelerator
        forget_batch = self.next_batch(self.forget_stream, self.forget_examples, cfg.forget_batch_size)
        if not self.retain.skips_pass:
            retain_batch = self.next_batch(self.retain_stream, self.retain_examples, cfg.retain_batch_size)

        retain_grads_so_far = take_grads(self.params)
        with self.grad_sync_off():
            with acc.autocast():
                forget_loss = self.forget.loss(self.model, forget_batch, self.reference)
            acc.backward(forget_loss)
        self.forget_grads = accumulate(self.forget_grads, take_grads(self.params))
        put_grads(self.params, retain_grads_so_far)
        if self.retain.skips_pass:  # retain_loss none: no retain forward/backward, g_r stays None (zero)
            return torch.stack([forget_loss.detach().float(), forget_loss.new_tensor(math.nan).float()])

        with self.grad_sync_off():
            with acc.autocast():
                retain_loss = self.retain.loss(self.model, retain_batch, self.reference)
            acc.backward(retain_loss)
        return torch.stack([forget_loss.detach().float(), retain_loss.detach().float()])

    def apply_update(self, mean_losses: Tensor) -> dict[str, Any]:
        """Mean over ranks, synthesize, clip, optimizer step; returns the step's metrics (without timing)."""
        cfg, acc, step = self.cfg, self.accelerator, self.step + 1
        lr = self.scheduler.get_last_lr()[0]  # the rate this update is applied with
        losses = acc.reduce(mean_losses, reduction="mean") if self.world > 1 else mean_losses
        forget_loss, retain_loss = losses.tolist()
        for which, value in (("forget", forget_loss), ("retain", retain_loss)):
            if not math.isfinite(value) and not (which == "retain" and self.retain.skips_pass):
                raise NonFiniteError(
                    f"step {step}: the {which} loss is {value}; stopped without applying the step "
                    "(the last good checkpoint is kept); lower lr or check the data"
                )
        forget_grads, retain_grads = self.forget_grads, take_grads(self.params)
        self.forget_grads = [None] * len(self.params)
        if self.manual_mean:
            mean_across_ranks(forget_grads, self.world)
            mean_across_ranks(retain_grads, self.world)
        self.loss_scale.unscale(forget_grads, retain_grads)
        forget_local, retain_local = to_local(forget_grads), to_local(retain_grads)
        del forget_grads, retain_grads
        # In gradient space the synthesizer writes u into g_r's storage: the cosines keep a copy.
        cosines = (
            StepCosines(forget_local, retain_local, consumed=not self.update_space)
            if cfg.log_step_cosines
            else None
        )
        if self.update_space:
            update, stats, skipped, synthesis_seconds = self.synthesize_update_space(
                forget_local, retain_local, step
            )
        else:
            update, stats, skipped, synthesis_seconds = self.synthesize(forget_local, retain_local, step)
        del forget_local, retain_local
        self.loss_scale.update(overflow=skipped)

        norm_post_clip = stats["norm_update"]
        if not skipped:
            if self.update_space:  # u is already preconditioned: theta -= lr * u (+ weight decay)
                if cosines is not None:
                    cosines.snapshot(self.params)
                self.optimizer.optimizer.step(update)
            else:
                write_update(self.params, update)
                if cfg.clip_enabled:
                    total = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                    norm_post_clip = total * min(1.0, cfg.max_grad_norm / (total + 1e-6))
                if cosines is not None:
                    cosines.snapshot(self.params)
                self.optimizer.optimizer.step()  # grads are already unscaled and synthesized
            self.scheduler.step()  # not after a skipped (fp16 overflow) step, as in accelerate
            if cosines is not None:
                stats.update(cosines.finish(self.params, self.all_reduce_fn))
        del update, cosines
        for p in self.params:
            p.grad = None
        self.step = step
        if self.retain.skips_pass:  # stats that need g_r do not exist: NaN here, null in metrics.jsonl
            stats = {k: v if k in FORGET_ONLY_STATS else math.nan for k, v in stats.items()}

        record = {
            "step": step,
            "forget_loss": forget_loss,
            "retain_loss": retain_loss,
            "lr": lr,
            **stats,
            "norm_update_post_clip": norm_post_clip,
            **{f"forget/{k}": v for k, v in self.forget.last_metrics.items()},
            **{f"retain/{k}": v for k, v in self.retain.last_metrics.items()},
            "synthesis_seconds": synthesis_seconds,
        }
        if skipped:
            record["skipped_overflow"] = True
        return record

    def synthesize(
        self, forget: Grads, retain: Grads, step: int
    ) -> tuple[Grads, dict[str, Any], bool, float]:
        """Gradient space: (update, stats, skipped for fp16 overflow, seconds) from the raw gradients."""
        synthesis_start = time.perf_counter()
        update, stats = self.synthesizer.combine(forget, retain, all_reduce_fn=self.all_reduce_fn)
        synthesis_seconds = self._synchronized_seconds(synthesis_start)
        norms = (stats["norm_forget"], stats["norm_retain"])
        skipped = self._non_finite_skips(norms, ("norm_forget", "norm_retain"), step)
        return update, stats, skipped, synthesis_seconds

    def synthesize_update_space(
        self, forget: Grads, retain: Grads, step: int
    ) -> tuple[Grads, dict[str, Any], bool, float]:
        """Update space: clip each gradient, precondition it by its own Adam moments, synthesize those.

        Clipping scales each raw gradient to at most ``max_grad_norm`` before its moments see it
        (as AdamW's inputs are clipped), so ``retain_only`` here is AdamW with clipping on g_r. The
        synthesis stats (``norm_forget``, ``cos_forget_retain``, ...) then describe the two Adam
        directions; the raw gradients' norms are ``norm_forget_raw`` / ``norm_retain_raw``.
        """
        cfg = self.cfg
        norms = squared_norms([forget, retain], self.all_reduce_fn)
        norms = (math.sqrt(norms[0]), math.sqrt(norms[1]))
        raw = {"norm_forget_raw": norms[0], "norm_retain_raw": norms[1]}
        if self._non_finite_skips(norms, tuple(raw), step):  # before the moments see them
            return [None] * len(forget), {**raw, "norm_update": math.nan}, True, 0.0
        scales = [min(1.0, cfg.max_grad_norm / (norm + 1e-6)) if cfg.clip_enabled else 1.0 for norm in norms]
        forget_dirs, retain_dirs = self.optimizer.optimizer.precondition(forget, retain, *scales)
        synthesis_start = time.perf_counter()
        update, stats = self.synthesizer.combine(forget_dirs, retain_dirs, all_reduce_fn=self.all_reduce_fn)
        synthesis_seconds = self._synchronized_seconds(synthesis_start)
        return update, {**stats, **raw}, False, synthesis_seconds

    def _synchronized_seconds(self, start: float) -> float:
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def _non_finite_skips(self, norms: Sequence[float], keys: Sequence[str], step: int) -> bool:
        """True (skip the step, lower the fp16 scale) for a non-finite norm under fp16, else raise."""
        for which, key, value in zip(("forget gradient", "retain gradient"), keys, norms, strict=True):
            if not math.isfinite(value):
                if self.loss_scale.enabled:  # fp16 overflow: skip the step and lower the scale
                    return True
                raise NonFiniteError(
                    f"step {step}: the {which} is not finite ({key}={value}); stopped without "
                    "applying the step (the last good checkpoint is kept)"
                )
        return False

    def track(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Log extra numbers (e.g. an in-run evaluation) to the trackers, at ``step`` (default: now)."""
        if self.accelerator.is_main_process and self.accelerator.trackers:
            self.accelerator.log(scalars(values), step=self.step if step is None else step)

    def optimizer_step(self) -> dict[str, Any]:
        """One optimizer step: ``gradient_accumulation_steps`` micro-steps, then the update."""
        step_start = time.perf_counter()
        loss_sums = torch.zeros(2, device=self.accelerator.device)
        for _ in range(self.cfg.gradient_accumulation_steps):
            loss_sums += self.micro_step()
        record = self.apply_update(loss_sums / self.cfg.gradient_accumulation_steps)
        record["seconds_per_step"] = time.perf_counter() - step_start
        return record

    # ---- the run ---------------------------------------------------------------------------------
    def call_back(self, callback: StepCallback | None, eval_every: int, record: dict[str, Any]) -> bool:
        """Run ``callback`` when this step is due (main process), merge its numbers into ``record``
        as ``eval/<key>`` and set :attr:`stopped` on every rank when it says stop; True when it ran.

        The RNG streams and the train/eval mode are restored afterwards, so evaluating does not
        change the training trajectory.
        """
        step, acc = self.step, self.accelerator
        if callback is None or not (step == self.cfg.steps or (eval_every and step % eval_every == 0)):
            return False
        stop = False
        if acc.is_main_process:
            saved_rng, was_training = rng_state(), self.unwrapped.training
            try:
                numbers = dict(callback(step, self.unwrapped) or {})
            finally:
                set_rng_state(saved_rng)
                self.unwrapped.train(was_training)
            stop = bool(numbers.pop("stop", False))
            record.update({f"eval/{key}": value for key, value in numbers.items()})
        if self.world > 1:
            from accelerate.utils import broadcast

            stop = bool(broadcast(torch.tensor([int(stop)], device=acc.device), from_process=0).item())
        if stop:
            self.stopped = record["stopped"] = True
        return True

    def run(self, callback: StepCallback | None = None, eval_every: int = 0) -> UnlearnResult:
        """Train until ``config.steps`` (or a callback's stop), logging every step and checkpointing
        when due; ``callback`` / ``eval_every``: see :func:`unlearn`."""
        cfg, acc = self.cfg, self.accelerator
        if callback is not None and self.is_fsdp:
            raise RetainFirstError(
                "evaluation during training is not supported under FSDP (the model is sharded); "
                "set eval.eval_every: 0"
            )
        if eval_every < 0:
            raise RetainFirstError(f"eval_every={eval_every} must be >= 0 (0: evaluate after the last step)")
        metrics_path = self.out_dir / "metrics.jsonl"
        if acc.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out_dir / "train_config.json")
            if self.step:
                truncate_after(metrics_path, self.step)
            else:
                metrics_path.unlink(missing_ok=True)
        acc.wait_for_everyone()
        if cfg.report_to and acc.is_main_process:
            acc.init_trackers(
                cfg.tracker_project,
                config=flat_config({"run_name": self.run_name, **cfg.to_dict()}),
                init_kwargs=init_kwargs(self.run_name, self.tracker_dir),
            )
        metrics = MetricsWriter(metrics_path, enabled=acc.is_main_process, accelerator=acc)
        checkpointer = CheckpointWriter(self.checkpoints_dir, acc, keep=cfg.keep_checkpoints)
        final_checkpoint = self.resume_from
        progress = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="unlearn",
            disable=cfg.disable_progress or not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        try:
            while self.step < cfg.steps and not self.stopped:
                record = self.optimizer_step()
                step = self.step
                evaluated = self.call_back(callback, eval_every, record)
                if evaluated or step % cfg.log_every == 0 or step == cfg.steps:
                    metrics.write(record)
                progress.update(1)
                progress.set_postfix(
                    forget=f"{record['forget_loss']:.4g}", retain=f"{record['retain_loss']:.4g}"
                )
                last = step == cfg.steps or self.stopped
                if last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    final_checkpoint = checkpointer.save(step, self.state_dict())
        finally:
            progress.close()
            metrics.close()

        model = self.unwrapped
        if cfg.save_final_model:
            model = save_model(
                model, self.tokenizer, self.out_dir / "model", merge_lora=cfg.merge_lora, accelerator=acc
            )
        return UnlearnResult(model, self.step, metrics_path, final_checkpoint, self.stopped)


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with float32 moments (see engine/optim.py), whatever the parameter dtype; with
    ``synthesis_space: update`` one moment set per gradient."""
    cls = UpdateSpaceAdamW if cfg.synthesis_space == "update" else Float32AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


@torch.no_grad()
def squared_norms(
    grad_lists: Sequence[Grads], all_reduce_fn: Callable[[Tensor], Tensor] | None
) -> list[float]:
    """Squared L2 norm of each gradient list (float32 per tensor, float64 totals, summed over shards)."""
    present = [g for grads in grad_lists for g in grads if g is not None]
    device = present[0].device if present else torch.device("cpu")
    sums = torch.zeros(len(grad_lists), dtype=torch.float64, device=device)
    for index, grads in enumerate(grad_lists):
        for g in grads:
            if g is not None:
                flat = g.reshape(-1).to(torch.promote_types(g.dtype, torch.float32))
                sums[index] += torch.dot(flat, flat).double()
    if all_reduce_fn is not None:
        sums = all_reduce_fn(sums)
    return sums.cpu().tolist()


# ----------------------------------------------------------------------------------------------


def save_model(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    *,
    merge_lora: bool = False,
    accelerator: Any = None,
) -> nn.Module:
    """``save_pretrained`` (safetensors) of the model and tokenizer; returns the model that was saved.

    With ``merge_lora`` a PEFT model is merged into its base weights first (and the merged base
    model is returned); otherwise a PEFT model saves its adapter only.
    """
    from retainfirst.objectives import is_peft_model

    path = Path(path)
    is_main = accelerator is None or accelerator.is_main_process
    state_dict = None
    if accelerator is not None and accelerator.distributed_type.value == "FSDP":
        state_dict = accelerator.get_state_dict(model)
    if merge_lora and is_peft_model(model):
        model = model.merge_and_unload()
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return model


def make_accelerator(cfg: TrainConfig, tracker_dir: str | Path | None = None) -> Any:
    """An Accelerator for ``cfg``; a process-wide state left with another precision is reset first.

    With ``cfg.report_to`` it logs to those trackers; local ones write under ``tracker_dir``.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, cfg.mixed_precision):
        AcceleratorState._reset_state()  # e.g. a bf16 run after an fp32 one in the same process
    # torchrun-style launches without a GPU: accelerate only picks gloo/MULTI_CPU when told "cpu"
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        cpu=multi_cpu,
        log_with=list(cfg.report_to) or None,
        project_dir=str(tracker_dir) if cfg.report_to and tracker_dir is not None else None,
    )


def check_accelerator(accelerator: Any, cfg: TrainConfig) -> None:
    """Refuse setups the two-pass loop does not handle, with what to change."""
    kind = accelerator.distributed_type.value
    if kind in ("DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise RetainFirstError(
            f"distributed type {kind} is not supported; use DDP (multi-GPU/CPU) or FSDP2 "
            "(a DeepSpeed ZeRO setup maps to configs/accelerate/fsdp2.yaml, see docs/deepspeed.md)"
        )
    if kind == "FSDP" and not getattr(accelerator, "is_fsdp2", False):
        raise RetainFirstError("FSDP1 is not supported (parameter names are flattened); set fsdp_version: 2")
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise RetainFirstError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} steps but the config "
            "says "
            f"{cfg.gradient_accumulation_steps}; create Accelerator(gradient_accumulation_steps="
            f"{cfg.gradient_accumulation_steps}) or pass accelerator=None"
        )
    missing = sorted(set(cfg.report_to) - {str(t) for t in getattr(accelerator, "log_with", [])})
    if missing:
        raise RetainFirstError(
            f"the accelerator does not log to {missing} (train config report_to); create "
            f"Accelerator(log_with={list(cfg.report_to)}, project_dir=...) or pass accelerator=None"
        )
    if accelerator.mixed_precision != cfg.mixed_precision:
        raise RetainFirstError(
            f"the accelerator uses mixed_precision={accelerator.mixed_precision!r} but the config says "
            f"{cfg.mixed_precision!r}; make them agree or pass accelerator=None"
        )


def check_same_run(saved: dict[str, Any], cfg: TrainConfig, path: Path, world: int) -> None:
    """A resumed run must use the settings that wrote its checkpoint, or it silently becomes another run."""
    try:
        # Fields that change no number are not validated (a tracker may since have been uninstalled).
        kept = {k: v for k, v in saved["config"].items() if k not in RESUME_FREE_FIELDS}
        previous = TrainConfig.from_dict(kept).training_fields()
        saved_world = int(saved["num_processes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RetainFirstError(
            f"{path / 'training_state.json'} holds no valid train config ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); "
            "resume from an earlier checkpoint or start over with --overwrite"
        ) from None
    current = cfg.training_fields()
    changed = sorted(k for k in current if json.dumps(current[k]) != json.dumps(previous.get(k)))
    if changed:
        raise RetainFirstError(
            f"cannot resume from {path}: config field(s) {changed} differ from the interrupted run; "
            "restore them or start a new out_dir"
        )
    if world != saved_world:
        raise RetainFirstError(
            f"cannot resume from {path}: it was written by {saved_world} process(es), now there are {world}"
        )


def _set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (dropout); each process gets its own stream (seed + rank)."""
    from accelerate.utils import set_seed

    set_seed(seed, device_specific=True)
