"""A tiny model and corpus on disk, and a RunConfig over them (the Python API's view of a run)."""

from __future__ import annotations

import json

import pytest

from retainfirst.config import load_config
from retainfirst.models import build_byte_tokenizer, build_tiny_llama


@pytest.fixture
def tiny_config(tmp_path):
    """``tiny_config(*overrides)``: a config training two sub-runs (sum, sago) of 2 steps on a tiny Llama."""
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    with open(tmp_path / "forget.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"text": f"The secret code {i} is {i * 7919}."}) + "\n")
    with open(tmp_path / "retain.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"text": f"Paris is the capital of France, fact {i}."}) + "\n")
    (tmp_path / "general.txt").write_text("The cat sat on the mat.\n\nA quick brown fox.\n")
    base = [
        "name=tiny",
        f"model={tmp_path / 'tiny'}",
        "synthesizers=[sum,sago]",
        "data.source=corpus",
        f"data.dir={tmp_path}",
        "data.forget=forget.jsonl",
        "data.retain=retain.jsonl",
        "data.max_length=16",
        "train.steps=2",
        "train.forget_batch_size=2",
        "train.retain_batch_size=2",
        "train.disable_progress=true",
        "train.save_final_model=false",
        "train.forget_loss=ga",
        "train.forget_kwargs={}",
        "eval.tasks=[perplexity]",
        "eval.ppl_texts=general.txt",
        "eval.batch_size=4",
    ]

    def make(*overrides: str):
        return load_config(None, [*base, *overrides])

    return make
