"""Shared fixtures: tiny models built in code (no hub) and the embedded SmolLM2 for `slow` tests."""

from __future__ import annotations

import os

import pytest
import torch

import retainfirst.config as config_module
from retainfirst.models import build_byte_tokenizer, build_tiny_llama

# Tiny models run fastest single-threaded, and a second thread only fights other processes for the two
# cores; RETAINFIRST_TEST_THREADS=2 lets the SmolLM2 tests use both on an otherwise idle machine.
torch.set_num_threads(int(os.environ.get("RETAINFIRST_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _plain_defaults_without_a_config_file(request, monkeypatch):
    """Tests build their configs from overrides on the plain defaults: without a config file the CLI
    would add the demo's matched-forgetting preset (a stop level and in-run evaluation every 2 steps)
    to every tiny run. Tests of the preset itself are marked ``demo_preset``."""
    if request.node.get_closest_marker("demo_preset") is None:
        monkeypatch.setattr(config_module, "DEMO_PRESET", {})


@pytest.fixture(scope="session")
def byte_tokenizer():
    return build_byte_tokenizer()


@pytest.fixture
def tiny_model(byte_tokenizer):
    """A fresh randomly initialised ~0.9M-param Llama (byte vocabulary) per test."""
    return build_tiny_llama(len(byte_tokenizer), seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (dequantised and cached on first use). Read-only: copy to train."""
    from retainfirst.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    return model, tokenizer
