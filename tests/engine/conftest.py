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
