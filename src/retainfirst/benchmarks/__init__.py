"""Benchmarks built on top of ``data`` and ``evals`` (the bundled facts benchmark)."""
