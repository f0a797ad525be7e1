"""Data order (seeded, independent, resumable, sharded) and the engine's collate."""

from __future__ import annotations

import pytest
import torch

from retainfirst.engine.batches import ExampleStream, check_examples, context_limit, rank_slice
from retainfirst.errors import RetainFirstError


def test_stream_is_seeded_and_cycles_through_full_epochs():
    a = ExampleStream(5, seed=3, stream="forget").take(15)
    assert a == ExampleStream(5, seed=3, stream="forget").take(15)
    for epoch in range(3):
        assert sorted(a[epoch * 5 : (epoch + 1) * 5]) == list(range(5))
    assert a[:5] != a[5:10] or a[5:10] != a[10:15]  # epochs are reshuffled
    assert a != ExampleStream(5, seed=4, stream="forget").take(15)


def test_streams_are_independent():
    forget = ExampleStream(50, seed=0, stream="forget").take(50)
    retain = ExampleStream(50, seed=0, stream="retain").take(50)
    assert forget != retain


def test_stream_resumes_from_its_position():
    full = ExampleStream(7, seed=1, stream="retain").take(20)
    head = ExampleStream(7, seed=1, stream="retain")
    head.take(9)
    resumed = ExampleStream(7, seed=1, stream="retain", position=head.position)
    assert full[9:] == resumed.take(11)


def test_rank_slices_union_is_the_global_batch():
    global_batch = ExampleStream(10, seed=0, stream="forget").take(8)
    shards = [rank_slice(global_batch, rank, 4) for rank in range(4)]
    assert [i for shard in shards for i in shard] == global_batch
    assert all(len(shard) == 2 for shard in shards)


def test_check_examples_errors():
    ok = {"input_ids": torch.arange(4), "attention_mask": torch.ones(4, dtype=torch.long)}
    with pytest.raises(RetainFirstError, match="forget data is empty"):
        check_examples([], "forget", 10)
    with pytest.raises(RetainFirstError, match="retain example 1 has 4 tokens but at most 3"):
        check_examples([{"input_ids": torch.arange(2)}, ok], "retain", 3)
    with pytest.raises(RetainFirstError, match="forget example 0: 'attention_mask' must be"):
        check_examples([{"input_ids": torch.arange(4), "attention_mask": torch.ones(3)}], "forget", 10)
    with pytest.raises(RetainFirstError, match="forget example 0 must be a dict"):
        check_examples([torch.arange(3)], "forget", 10)
    check_examples([ok], "forget", 4)


def test_context_limit_uses_model_and_config(tiny_model):
    assert context_limit(tiny_model, None) == tiny_model.config.max_position_embeddings
    assert context_limit(tiny_model, 64) == 64
