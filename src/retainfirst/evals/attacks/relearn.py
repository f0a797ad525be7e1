"""Relearning attack: a few fine-tuning steps on forget-related text, then the forget evaluations.

If unlearning only hid the knowledge, a short fine-tune on *related* text brings it back, even on
facts the attacker never showed the model (Hu et al., 2024, "Jogging the memory of unlearned LLMs
through targeted relearning attacks"). Two ways to pick that text from the forget material:

- ``targets`` (held-out facts, the stronger test): the forget targets (the ``target`` of the forget
  probes: an entity) are split, seeded, into a relearn share and an evaluated share. The attacker
  fine-tunes on the passages that name a relearn target and neither name an evaluated target nor
  contain one of its gold answers; only the evaluated targets' probes are scored. Recovery there is
  knowledge coming back by itself, not re-taught.
- ``passages``: a seeded share of the forget passages (those the model unlearned on), every forget
  probe scored. The classic relearning attack; recovery is partly re-teaching.

The fine-tune is plain next-token NLL with AdamW on a deep copy, dropout off, seeded batch order.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from retainfirst.errors import RetainFirstError

SPLITS = ("targets", "passages")


def split_targets(targets: Iterable[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of the distinct targets into (relearned, evaluated); each side gets at least one."""
    order = sorted(set(targets))
    if len(order) < 2:
        raise RetainFirstError(
            f"relearn_split=targets needs at least 2 forget targets, got {len(order)}; "
            "use relearn_split=passages"
        )
    random.Random(f"{seed}:relearn-targets").shuffle(order)
    count = min(max(round(fraction * len(order)), 1), len(order) - 1)
    return sorted(order[:count]), sorted(order[count:])


def _names_pattern(names: Iterable[str], flags: int = 0) -> re.Pattern[str] | None:
    words = sorted({n.strip() for n in names if n and n.strip()}, key=len, reverse=True)
    if not words:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", flags)


def texts_naming(
    texts: Sequence[str],
    include: Iterable[str],
    exclude: Iterable[str] = (),
    exclude_exact: Iterable[str] = (),
) -> list[str]:
    """The texts naming one of ``include`` and none of ``exclude`` (whole words, any case) nor of
    ``exclude_exact`` (whole words, this case: answers such as the element symbol "In")."""
    wanted = _names_pattern(include, re.IGNORECASE)
    banned = [p for p in (_names_pattern(exclude, re.IGNORECASE), _names_pattern(exclude_exact)) if p]
    if wanted is None:
        return []
    return [t for t in texts if wanted.search(t) and not any(p.search(t) for p in banned)]


def sample_share(texts: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded ``fraction`` of ``texts`` (at least one), in their original order."""
    count = min(max(round(fraction * len(texts)), 1), len(texts))
    keep = set(random.Random(f"{seed}:relearn-passages").sample(range(len(texts)), count))
    return [t for i, t in enumerate(texts) if i in keep]


def batch_order(n_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices of each step: seeded permutations of all examples, one after another."""
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    needed = steps * batch_size
    while len(stream) < needed:
        stream += torch.randperm(n_examples, generator=generator).tolist()
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def token_nll(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over the tokens ``loss_mask`` marks (padding never counts)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = ids[:, 1:]
    weights = (batch.get("loss_mask", mask)[:, 1:] * mask[:, 1:]).float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * weights).sum() / weights.sum().clamp_min(1.0)


def finetune(
    model: Any,
    examples: Sequence[dict[str, torch.Tensor]],
    pad_token_id: int | None,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Fine-tune every parameter of ``model`` in place for ``steps`` AdamW steps; the step losses."""
    from retainfirst.data import collate

    if not examples:
        raise RetainFirstError("the relearning attack got no text to fine-tune on")
    device = next(model.parameters()).device
    parameters = list(model.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.eval()  # no dropout: the attack is deterministic
    losses: list[float] = []
    try:
        for indices in batch_order(len(examples), steps, batch_size, seed):
            batch = {
                k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_token_id).items()
            }
            loss = token_nll(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return losses
