"""Experiments: run directories, the runner (prepare, train each sub-run, evaluate, report)."""
