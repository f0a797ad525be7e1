"""MUSE (muse-bench/MUSE-News and MUSE-Books, Shi et al. 2024) from a local copy of the dataset.

Each split of a config is looked up under ``folder/<config>/`` as

* ``<split>-*.parquet`` (the hub layout, e.g. ``knowmem/forget_qa-00000-of-00001.parquet``),
* ``<split>/*.parquet``, or
* ``<split>.json`` / ``<split>.jsonl`` (the layout MUSE's ``load_data.py`` writes: ``data/news/...``).

Configs and splits read here: ``verbmem/forget`` (``prompt``, ``gt``), ``knowmem/forget_qa``,
``forget_qa_icl``, ``retain_qa``, ``retain_qa_icl`` (``question``, ``answer``; older hub revisions
and MUSE-Books call the retain splits ``retain2_qa`` / ``retain2_qa_icl``), ``privleak/forget``,
``holdout`` and ``retain`` (or ``retain2``) (``text``; a JSON array of strings also works), and the
training texts ``raw/forget``, ``raw/retain1``, ``raw/retain2``, ``raw/holdout`` (``text``).
Missing KnowMem files leave those lists empty (MUSE's own code has no KnowMem for Books).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retainfirst.data.corpora import read_records, require_text
from retainfirst.data.tofu import read_json_or_lines
from retainfirst.errors import RetainFirstError

ALIASES = {
    "retain_qa": ("retain_qa", "retain2_qa"),
    "retain_qa_icl": ("retain_qa_icl", "retain2_qa_icl"),
    "retain": ("retain", "retain2"),
}


@dataclass
class MuseData:
    """The evaluation sets of one MUSE corpus."""

    verbmem: list[tuple[str, str]] = field(default_factory=list)  # (prompt, ground-truth continuation)
    knowmem_forget: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)
    knowmem_forget_icl: list[tuple[str, str]] = field(default_factory=list)
    knowmem_retain: list[tuple[str, str]] = field(default_factory=list)
    knowmem_retain_icl: list[tuple[str, str]] = field(default_factory=list)
    privleak_forget: list[str] = field(default_factory=list)
    privleak_holdout: list[str] = field(default_factory=list)
    privleak_retain: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(value) for name, value in vars(self).items()}


def split_files(folder: str | Path, config: str, split: str) -> list[Path]:
    """The files of ``config/split`` (any alias of ``split``); empty when there are none."""
    base = Path(folder) / config
    for name in ALIASES.get(split, (split,)):
        for suffix in (".json", ".jsonl"):
            if (base / f"{name}{suffix}").is_file():
                return [base / f"{name}{suffix}"]
        files = sorted(base.glob(f"{name}-*.parquet"))
        if not files and (base / name).is_dir():
            files = sorted((base / name).rglob("*.parquet"))
        if files:
            return files
    return []


def read_split(
    folder: str | Path, config: str, split: str, *, required: bool = True
) -> list[tuple[Path, int, dict[str, Any]]]:
    files = split_files(folder, config, split)
    if not files:
        if required:
            names = " or ".join(ALIASES.get(split, (split,)))
            raise RetainFirstError(
                f"{Path(folder) / config}: no MUSE split {names!r}; "
                "expected <split>-*.parquet or <split>.json"
            )
        return []
    out = []
    for path in files:
        records = read_json_or_lines(path) if path.suffix == ".json" else read_records(path)
        out.extend((path, number, record) for number, record in records)
    return out


def _pairs(
    folder: str | Path, config: str, split: str, first: str, second: str, required: bool
) -> list[tuple[str, str]]:
    return [
        (require_text(r, first, p, n), require_text(r, second, p, n))
        for p, n, r in read_split(folder, config, split, required=required)
    ]


def load_muse_texts(folder: str | Path, config: str, split: str, *, required: bool = True) -> list[str]:
    """The ``text`` of each record of ``config/split`` (e.g. ``raw/forget``, ``privleak/holdout``)."""
    return [require_text(r, "text", p, n) for p, n, r in read_split(folder, config, split, required=required)]


def load_muse(folder: str | Path, *, knowmem: bool = True) -> MuseData:
    """VerbMem, KnowMem (when present, or ``knowmem=False``) and PrivLeak sets of a MUSE corpus folder."""
    if not Path(folder).is_dir():
        raise RetainFirstError(f"MUSE folder {folder} does not exist")
    data = MuseData(
        verbmem=_pairs(folder, "verbmem", "forget", "prompt", "gt", True),
        privleak_forget=load_muse_texts(folder, "privleak", "forget"),
        privleak_holdout=load_muse_texts(folder, "privleak", "holdout"),
        privleak_retain=load_muse_texts(folder, "privleak", "retain", required=False),
    )
    if knowmem:
        data.knowmem_forget = _pairs(folder, "knowmem", "forget_qa", "question", "answer", False)
        data.knowmem_forget_icl = _pairs(folder, "knowmem", "forget_qa_icl", "question", "answer", False)
        data.knowmem_retain = _pairs(folder, "knowmem", "retain_qa", "question", "answer", False)
        data.knowmem_retain_icl = _pairs(folder, "knowmem", "retain_qa_icl", "question", "answer", False)
    return data
