"""One built benchmark (``FactBenchmark``) and its versioned JSON file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retainfirst.benchmarks.facts.corpus import MMLUSubsetSpec
from retainfirst.benchmarks.facts.schema import PROBE_SETS, Fact, read_json
from retainfirst.data.probes import Probe
from retainfirst.errors import RetainFirstError
from retainfirst.io import atomic_write_text

BENCHMARK_VERSION = "facts-2"  # facts-2: held-out and general-knowledge sets, paraphrase probes


@dataclass
class FactBenchmark:
    """Forget/retain corpora, RWKU-style probes, held-out text and the MMLU subset of one build.

    ``retain_facts`` are the facts the retain corpus is made of (probes ``retain_fit_*``);
    ``heldout_facts`` share their relation families but appear in no corpus (``heldout_*``);
    ``general_facts`` are general-knowledge questions no corpus touches (``general_qa``).
    """

    forget_corpus: list[str]
    retain_corpus: list[str]
    probes: dict[str, list[Probe]]
    general_texts: list[str]
    forget_facts: list[Fact]
    retain_facts: list[Fact]
    heldout_facts: list[Fact] = field(default_factory=list)
    general_facts: list[Fact] = field(default_factory=list)
    mmlu_subset_spec: MMLUSubsetSpec = field(default_factory=MMLUSubsetSpec)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``evaluate_generation`` matching the knowledge filter of this build."""
        return dict(self.stats.get("evaluation", {}))

    @property
    def forget_targets(self) -> list[str]:
        return list(dict.fromkeys(f.subject for f in self.forget_facts))

    @property
    def retain_targets(self) -> list[str]:
        return list(dict.fromkeys(f.subject for f in self.retain_facts))

    @property
    def heldout_targets(self) -> list[str]:
        return list(dict.fromkeys(f.subject for f in self.heldout_facts))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": BENCHMARK_VERSION,
            "stats": self.stats,
            "forget_facts": [asdict(f) for f in self.forget_facts],
            "retain_facts": [asdict(f) for f in self.retain_facts],
            "heldout_facts": [asdict(f) for f in self.heldout_facts],
            "general_facts": [asdict(f) for f in self.general_facts],
            "forget_corpus": self.forget_corpus,
            "retain_corpus": self.retain_corpus,
            "probes": {name: [asdict(p) for p in probes] for name, probes in self.probes.items()},
            "general_texts": self.general_texts,
            "mmlu_subset_spec": asdict(self.mmlu_subset_spec),
        }

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (via :mod:`retainfirst.io`); these bytes are the cache file format."""
        return atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> FactBenchmark:
        """Read a saved benchmark; a different BENCHMARK_VERSION or a malformed file is an error."""
        path = Path(path)
        data = read_json(path)
        if not isinstance(data, dict):
            raise RetainFirstError(f"{path}: not a saved facts benchmark (expected a JSON object)")
        version = data.get("version")
        if version != BENCHMARK_VERSION:
            raise RetainFirstError(
                f"{path}: benchmark version {version!r} differs from this code's "
                f"{BENCHMARK_VERSION!r}; rebuild it"
            )
        try:
            probes = {name: [Probe(**p) for p in data["probes"][name]] for name in PROBE_SETS}
            return cls(
                forget_corpus=[str(t) for t in data["forget_corpus"]],
                retain_corpus=[str(t) for t in data["retain_corpus"]],
                probes=probes,
                general_texts=[str(t) for t in data["general_texts"]],
                forget_facts=[Fact(**f) for f in data["forget_facts"]],
                retain_facts=[Fact(**f) for f in data["retain_facts"]],
                heldout_facts=[Fact(**f) for f in data["heldout_facts"]],
                general_facts=[Fact(**f) for f in data["general_facts"]],
                mmlu_subset_spec=MMLUSubsetSpec(
                    subjects=tuple(data["mmlu_subset_spec"]["subjects"]),
                    per_subject=int(data["mmlu_subset_spec"]["per_subject"]),
                    seed=int(data["mmlu_subset_spec"]["seed"]),
                ),
                stats=dict(data["stats"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RetainFirstError(
                f"{path}: malformed facts benchmark ({type(exc).__name__}: {exc}); rebuild it"
            ) from exc
