"""The bundled facts benchmark (for now re-exported from ``retainfirst.data.facts``)."""

from retainfirst.data.facts import FactBenchmark, build_fact_benchmark, load_or_build_fact_benchmark

__all__ = ["FactBenchmark", "build_fact_benchmark", "load_or_build_fact_benchmark"]
