"""Fixtures of the engine tests: the shared worker module (also run as a subprocess script)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

WORKER_PATH = Path(__file__).with_name("engine_worker.py")


@pytest.fixture(scope="session")
def worker():
    """tests/engine/engine_worker.py as a module: tiny_setup(), fixed_length_examples(), ..."""
    name = "retainfirst_engine_test_worker"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, WORKER_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Engine tests run many tiny matmuls: one thread avoids OpenMP stalls on a busy 2-core box
    (measured: 0.5 s instead of 23 s for a 3-step tiny run while other jobs load the CPUs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
