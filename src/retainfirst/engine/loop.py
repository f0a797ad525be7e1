"""The unlearning loop: two passes per micro-batch, one synthesized update per optimizer step.

One optimizer step, read top to bottom in :func:`unlearn`:

1. for each micro-batch: forward+backward of the forget loss, then move those gradients into a
   stash (the forget graph is freed before the retain forward runs); forward+backward of the retain
   loss (accumulating in ``param.grad``). Losses are divided by the accumulation steps (by
   ``accelerator.backward``) so gradients are means.
2. at the accumulation boundary: average both gradient lists over processes, synthesize the update
   from (forget, retain), write it into ``param.grad``, clip, optimizer step, LR schedule step.
3. log one metrics line, checkpoint when due.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from retainfirst.data import collate
from retainfirst.engine.batches import (
    Example,
    ExampleStream,
    check_examples,
    context_limit,
    rank_slice,
)
from retainfirst.engine.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    load_model_state,
    model_state,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from retainfirst.engine.config import TrainConfig
from retainfirst.engine.grads import (
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
from retainfirst.errors import NonFiniteError, RetainFirstError

SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class UnlearnResult:
    model: nn.Module = field(repr=False)  # unwrapped (a PeftModel with LoRA unless merge_lora)
    steps_done: int
    metrics_path: Path
    final_checkpoint: Path | None


def unlearn(
    model: nn.Module,
    tokenizer: Any,
    forget_examples: Sequence[Example],
    retain_examples: Sequence[Example],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    accelerator: Any = None,
) -> UnlearnResult:
    """Run ``config.steps`` unlearning steps on ``model``; see the module docstring for one step."""
    from retainfirst.objectives import get_forget_objective, get_retain_objective, make_reference
    from retainfirst.synthesis import get_synthesizer

    cfg = config
    cfg.validate()
    out_dir = Path(out_dir)
    accelerator = accelerator if accelerator is not None else make_accelerator(cfg)
    check_accelerator(accelerator, cfg)
    is_fsdp = accelerator.distributed_type.value == "FSDP"
    world, rank = accelerator.num_processes, accelerator.process_index

    # ---- everything that can be wrong is checked before the first step --------------------
    limit = context_limit(model, cfg.max_length)
    check_examples(forget_examples, "forget", limit)
    check_examples(retain_examples, "retain", limit)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    forget = get_forget_objective(cfg.forget_loss, **cfg.forget_kwargs)
    retain = get_retain_objective(cfg.retain_loss, **cfg.retain_kwargs)
    synthesizer = get_synthesizer(cfg.synthesizer, cfg.alpha, cfg.gamma, **cfg.synthesizer_options)
    checkpoints_dir = out_dir / "checkpoints"
    resume_from = latest_checkpoint(checkpoints_dir) if resume else None
    if not resume and latest_checkpoint(checkpoints_dir) is not None:
        raise RetainFirstError(
            f"{out_dir} already holds checkpoints of a run; "
            "pass resume=True to continue it or use a new out_dir"
        )
    if resume_from is not None and is_fsdp:
        # Checkpoints hold the gathered model but only rank 0's optimizer shard: resuming would
        # silently restart the other ranks' Adam moments, so refuse rather than diverge.
        raise RetainFirstError(
            "resuming an FSDP run is not supported yet (checkpoints keep only rank 0's optimizer shard); "
            f"start a new run from the weights in {resume_from}"
        )
    saved_state = read_checkpoint(resume_from, rank) if resume_from is not None else None
    if saved_state is not None:
        check_same_run(saved_state["config"], cfg, resume_from, world, saved_state["num_processes"])

    # ---- model: seed, adapters, trainable set, reference ------------------------------------
    _set_seed(cfg.seed)
    lora = cfg.lora is not None
    if lora:
        if is_fsdp:
            raise RetainFirstError(
                "lora with FSDP is not supported; use DDP (or full fine-tuning under FSDP)"
            )
        model = apply_lora(model, cfg.lora, cfg.seed)
    patterns = cfg.trainable_patterns
    if patterns is None and not lora:
        patterns = forget.trainable_patterns
    trainable_names = select_trainable(model, patterns, lora=lora)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, lora=lora)
    model.to(accelerator.device)
    model.train()
    forget.setup(model, seed=cfg.seed)
    retain.setup(model, seed=cfg.seed)
    needs_reference = forget.needs_reference or retain.needs_reference
    reference = make_reference(model) if needs_reference else None  # before loading a checkpoint
    if resume_from is not None:
        load_model_state(model, saved_state["model"], lora, resume_from)
        forget.load_state_dict(saved_state["forget_objective"])
        retain.load_state_dict(saved_state["retain_objective"])

    # ---- optimizer, schedule, accelerate ----------------------------------------------------
    from transformers import get_scheduler

    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [named[name] for name in trainable_names],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    # The scheduler is stepped by us once per optimizer step (accelerate's wrapper would step it
    # once per process), so it is built on the raw optimizer and not passed to prepare().
    scheduler = get_scheduler(
        SCHEDULER_NAMES[cfg.lr_schedule],
        optimizer=optimizer,
        num_warmup_steps=cfg.num_warmup_steps,
        num_training_steps=cfg.steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    named = dict(unwrapped.named_parameters())  # FSDP2 swaps parameters for DTensors in prepare()
    params = [named[name] for name in trainable_names]
    loss_scale = LossScale(accelerator.scaler)
    forget_stream = ExampleStream(len(forget_examples), cfg.seed, "forget")
    retain_stream = ExampleStream(len(retain_examples), cfg.seed, "retain")
    start_step = 0
    if saved_state is not None:
        optimizer.load_state_dict(saved_state["optimizer"])
        scheduler.load_state_dict(saved_state["scheduler"])
        loss_scale.load_state_dict(saved_state["loss_scale"])
        forget_stream.position = saved_state["forget_position"]
        retain_stream.position = saved_state["retain_position"]
        start_step = saved_state["step"]
        set_rng_state(saved_state["rng"])  # last, so nothing above consumes the restored streams

    # ---- run files ---------------------------------------------------------------------------
    metrics_path = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "train_config.json")
        if start_step:
            truncate_after(metrics_path, start_step)
        else:
            metrics_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    metrics = MetricsWriter(metrics_path, enabled=accelerator.is_main_process)
    checkpointer = CheckpointWriter(checkpoints_dir, accelerator, keep=cfg.keep_checkpoints)
    # DDP: no backward syncs; both gradient lists are averaged by hand at the boundary.
    # FSDP: every backward reduce-scatters (the gradients are sharded), no manual mean.
    manual_mean = world > 1 and not is_fsdp
    all_reduce_fn = all_reduce_sum if is_fsdp else None

    def next_batch(stream: ExampleStream, examples: Sequence[Example], per_device: int) -> dict[str, Tensor]:
        indices = rank_slice(stream.take(per_device * world), rank, world)
        batch = collate([examples[i] for i in indices], pad_token_id)
        return {key: value.to(accelerator.device) for key, value in batch.items()}

    def grad_sync_off() -> contextlib.AbstractContextManager:
        return accelerator.no_sync(model) if manual_mean else contextlib.nullcontext()

    final_checkpoint = resume_from
    progress = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc="unlearn",
        disable=cfg.disable_progress or not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    step = start_step
    try:
        while step < cfg.steps:
            step_start = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            forget_grads: list[Tensor | None] = [None] * len(params)
            loss_sums = torch.zeros(2, device=accelerator.device)

            for _micro_step in range(cfg.gradient_accumulation_steps):
                forget_batch = next_batch(forget_stream, forget_examples, cfg.forget_batch_size)
                retain_batch = next_batch(retain_stream, retain_examples, cfg.retain_batch_size)

                # forget pass: its gradients go to the stash, param.grad keeps only retain gradients
                retain_grads_so_far = take_grads(params)
                with grad_sync_off():
                    with accelerator.autocast():
                        forget_loss = forget.loss(model, forget_batch, reference)
                    accelerator.backward(forget_loss)
                forget_grads = accumulate(forget_grads, take_grads(params))
                put_grads(params, retain_grads_so_far)

                # retain pass: gradients accumulate in param.grad
                with grad_sync_off():
                    with accelerator.autocast():
                        retain_loss = retain.loss(model, retain_batch, reference)
                    accelerator.backward(retain_loss)
                loss_sums += torch.stack([forget_loss.detach().float(), retain_loss.detach().float()])

            # ---- accumulation boundary: mean over processes, then synthesize ------------------
            losses = loss_sums / cfg.gradient_accumulation_steps
            if world > 1:
                losses = accelerator.reduce(losses, reduction="mean")
            forget_loss_value, retain_loss_value = losses.tolist()
            for which, value in (("forget", forget_loss_value), ("retain", retain_loss_value)):
                if not math.isfinite(value):
                    raise NonFiniteError(
                        f"step {step + 1}: the {which} loss is {value}; stopped without applying the step "
                        "(the last good checkpoint is kept); lower lr or check the data"
                    )
            retain_grads = take_grads(params)
            if manual_mean:
                mean_across_ranks(forget_grads, world)
                mean_across_ranks(retain_grads, world)
            loss_scale.unscale(forget_grads, retain_grads)

            synthesis_start = time.perf_counter()
            update, stats = synthesizer.combine(
                to_local(forget_grads), to_local(retain_grads), all_reduce_fn=all_reduce_fn
            )
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            synthesis_seconds = time.perf_counter() - synthesis_start
            del forget_grads, retain_grads

            skipped = False
            for which, key in (("forget gradient", "norm_forget"), ("retain gradient", "norm_retain")):
                if not math.isfinite(stats[key]):
                    if loss_scale.enabled:  # fp16 overflow: skip the step and lower the scale
                        skipped = True
                        break
                    raise NonFiniteError(
                        f"step {step + 1}: the {which} is not finite ({key}={stats[key]}); stopped without "
                        "applying the step (the last good checkpoint is kept)"
                    )
            loss_scale.update(overflow=skipped)

            norm_post_clip = stats["norm_update"]
            if not skipped:
                write_update(params, update)
                if cfg.clip_enabled:
                    total = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                    norm_post_clip = total * min(1.0, cfg.max_grad_norm / (total + 1e-6))
                optimizer.optimizer.step()  # grads are already unscaled and synthesized
                scheduler.step()  # not after a skipped (fp16 overflow) step, as in accelerate
            del update
            for p in params:
                p.grad = None
            step += 1

            # ---- log and checkpoint ------------------------------------------------------------
            record = {
                "step": step,
                "forget_loss": forget_loss_value,
                "retain_loss": retain_loss_value,
                "lr": lr,
                **stats,
                "norm_update_post_clip": norm_post_clip,
                **{f"forget/{k}": v for k, v in forget.last_metrics.items()},
                **{f"retain/{k}": v for k, v in retain.last_metrics.items()},
                "synthesis_seconds": synthesis_seconds,
                "seconds_per_step": time.perf_counter() - step_start,
            }
            if skipped:
                record["skipped_overflow"] = True
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics.write(record)
            progress.update(1)
            progress.set_postfix(forget=f"{forget_loss_value:.4g}", retain=f"{retain_loss_value:.4g}")

            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                full_state = accelerator.get_state_dict(model) if is_fsdp else None
                final_checkpoint = checkpointer.save(
                    step,
                    {
                        "model": model_state(unwrapped, lora, full_state),
                        "rng": rng_state(),
                        "step": step,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "loss_scale": loss_scale.state_dict(),
                        "forget_position": forget_stream.position,
                        "retain_position": retain_stream.position,
                        "forget_objective": forget.state_dict(),
                        "retain_objective": retain.state_dict(),
                        "num_processes": world,
                        "config": cfg.to_dict(),
                    },
                )
    finally:
        progress.close()
        metrics.close()

    if cfg.save_final_model:
        unwrapped = save_model(
            unwrapped, tokenizer, out_dir / "model", merge_lora=cfg.merge_lora, accelerator=accelerator
        )
    return UnlearnResult(unwrapped, step, metrics_path, final_checkpoint)


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


def make_accelerator(cfg: TrainConfig) -> Any:
    """An Accelerator for ``cfg``; a process-wide state left with another precision is reset first."""
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
    )


def check_accelerator(accelerator: Any, cfg: TrainConfig) -> None:
    """Refuse setups the two-pass loop does not handle, with what to change."""
    kind = accelerator.distributed_type.value
    if kind in ("DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise RetainFirstError(f"distributed type {kind} is not supported; use DDP (multi-GPU/CPU) or FSDP2")
    if kind == "FSDP" and not getattr(accelerator, "is_fsdp2", False):
        raise RetainFirstError("FSDP1 is not supported (parameter names are flattened); set fsdp_version: 2")
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation_steps:
        raise RetainFirstError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} steps but the config "
            "says "
            f"{cfg.gradient_accumulation_steps}; create Accelerator(gradient_accumulation_steps="
            f"{cfg.gradient_accumulation_steps}) or pass accelerator=None"
        )
    if accelerator.mixed_precision != cfg.mixed_precision:
        raise RetainFirstError(
            f"the accelerator uses mixed_precision={accelerator.mixed_precision!r} but the config says "
            f"{cfg.mixed_precision!r}; make them agree or pass accelerator=None"
        )


def check_same_run(saved: dict[str, Any], cfg: TrainConfig, path: Path, world: int, saved_world: int) -> None:
    """A resumed run must use the settings that wrote its checkpoint, or it silently becomes another run."""
    previous = TrainConfig.from_dict(saved).training_fields()
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
