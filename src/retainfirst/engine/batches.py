"""Data order for the two streams: seeded, resumable, and sharded so ranks split one global batch.

Each stream (forget, retain) draws examples from its own seeded permutation per epoch, so the two
orders are independent and a run is fixed by its seed. The state of a stream is one integer (how
many examples it has handed out), which makes resuming exact. A micro-batch is drawn globally
(per-device size x processes) and each rank keeps its own slice, so the union of the rank batches
is exactly the batch a single process would see.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from retainfirst.errors import RetainFirstError

Example = dict[str, Tensor]

STREAM_IDS = {"forget": 0, "retain": 1}


class ExampleStream:
    """Endless, seeded order over ``size`` examples: a fresh permutation each epoch."""

    def __init__(self, size: int, seed: int, stream: str, position: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.stream_id = STREAM_IDS[stream]
        self.position = position
        self._epoch = -1
        self._order: list[int] = []

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            entropy = np.random.SeedSequence([self.seed, self.stream_id, epoch]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(entropy))
            self._order = torch.randperm(self.size, generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def take(self, count: int) -> list[int]:
        """The next ``count`` example indices (cycling through epochs as needed)."""
        indices = []
        for _ in range(count):
            epoch, offset = divmod(self.position, self.size)
            indices.append(self._epoch_order(epoch)[offset])
            self.position += 1
        return indices


def rank_slice(global_indices: list[int], rank: int, num_processes: int) -> list[int]:
    """This rank's contiguous share of a global micro-batch."""
    per_rank = len(global_indices) // num_processes
    return global_indices[rank * per_rank : (rank + 1) * per_rank]


def check_examples(examples: Sequence[Example], stream: str, max_tokens: int) -> None:
    """Fail before training on empty data, malformed examples or sequences longer than the context."""
    if examples is None or len(examples) == 0:
        raise RetainFirstError(f"the {stream} data is empty; pass at least one tokenized {stream} example")
    for index, example in enumerate(examples):
        if not isinstance(example, dict) or "input_ids" not in example:
            raise RetainFirstError(
                f"{stream} example {index} must be a dict with 'input_ids' (and 'attention_mask'), "
                f"got {type(example).__name__}"
            )
        ids = example["input_ids"]
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.numel() == 0:
            raise RetainFirstError(f"{stream} example {index}: 'input_ids' must be a non-empty 1-D tensor")
        for key in ("attention_mask", "loss_mask"):
            value = example.get(key)
            if value is not None and (not isinstance(value, Tensor) or value.shape != ids.shape):
                raise RetainFirstError(
                    f"{stream} example {index}: {key!r} must be a 1-D tensor shaped like "
                    f"input_ids {tuple(ids.shape)}"
                )
        if ids.numel() > max_tokens:
            raise RetainFirstError(
                f"{stream} example {index} has {ids.numel()} tokens but at most {max_tokens} fit "
                "(model context / max_length); tokenize with a smaller max_length"
            )


def context_limit(model: torch.nn.Module, max_length: int | None) -> int:
    """Longest sequence allowed: the model's max_position_embeddings, capped by the config's max_length."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or 10**9
    return min(limit, max_length) if max_length else limit
