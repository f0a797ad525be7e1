"""RWKU (Real-World Knowledge Unlearning, jinzhuoran/RWKU) from a local copy of its JSON files.

Two layouts of the same files are read:

* per target (``RWKU/Target/{i}_{Name_With_Underscores}/`` as produced by the repository's
  ``process/data_process.py`` and shipped in its Google-Drive / Hugging Face copies), and
* combined (``RWKU/All/`` of the Hugging Face repository), where every record names its target in
  ``subject``.

Files (each a JSON array): ``intro.json`` (``target``, ``intro``), ``passage.json`` (forget corpus,
``text``), ``forget_level1.json`` (fill-in-the-blank), ``forget_level2.json`` (question answering),
``forget_level3.json`` (adversarial, attack kind in ``type``), ``neighbor_level1.json``,
``neighbor_level2.json`` (probe records: ``query``, ``answer``, ``level``, ``type``, ``subject``),
``forget_mia.json`` / ``retain_mia.json`` (``text``). Files a copy lacks are left empty (logged);
``folder`` may be the RWKU root, its ``Target`` / ``All`` folder or one target's folder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from retainfirst.data.corpora import read_records, require_field, require_text
from retainfirst.data.probes import Probe
from retainfirst.errors import RetainFirstError

logger = logging.getLogger(__name__)

PROBE_FILES = {
    "forget_fb": ("forget_level1.json", "1"),
    "forget_qa": ("forget_level2.json", "2"),
    "forget_aa": ("forget_level3.json", "3"),
    "neighbor_fb": ("neighbor_level1.json", "1"),
    "neighbor_qa": ("neighbor_level2.json", "2"),
}
TEXT_FILES = {"passages": "passage.json", "mia_forget": "forget_mia.json", "mia_retain": "retain_mia.json"}
_TARGET_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass
class RWKUData:
    """RWKU split by target.

    Attributes:
        targets: target names in benchmark order (target 1 first).
        passages: ``{target: [passage, ...]}``: the original forget corpus of each target.
        probes: ``{"forget_fb" | "forget_qa" | "forget_aa" | "neighbor_fb" | "neighbor_qa": [Probe]}``.
        mia_forget, mia_retain: ``{target: [text, ...]}`` membership-inference sets.
    """

    targets: list[str]
    passages: dict[str, list[str]] = field(default_factory=dict)
    probes: dict[str, list[Probe]] = field(default_factory=dict)
    mia_forget: dict[str, list[str]] = field(default_factory=dict)
    mia_retain: dict[str, list[str]] = field(default_factory=dict)

    def forget_corpus(self, targets: Sequence[str] | None = None) -> list[str]:
        """Passages of ``targets`` (default all), e.g. the forget set of the batch setting 1-50."""
        return [p for t in (targets or self.targets) for p in self.passages.get(t, [])]

    def texts(self, kind: str, targets: Sequence[str] | None = None) -> list[str]:
        """Flattened ``mia_forget`` / ``mia_retain`` texts of ``targets`` (default all)."""
        table = {"mia_forget": self.mia_forget, "mia_retain": self.mia_retain, "passages": self.passages}[
            kind
        ]
        return [t for target in (targets or self.targets) for t in table.get(target, [])]

    def counts(self) -> dict[str, int]:
        counts = {name: len(probes) for name, probes in self.probes.items()}
        counts["targets"] = len(self.targets)
        counts["passages"] = sum(len(v) for v in self.passages.values())
        counts["mia_forget"] = sum(len(v) for v in self.mia_forget.values())
        counts["mia_retain"] = sum(len(v) for v in self.mia_retain.values())
        return counts


def _target_folders(folder: Path) -> list[tuple[int, str, Path]]:
    found = []
    for child in folder.iterdir() if folder.is_dir() else []:
        match = _TARGET_DIR.match(child.name)
        if child.is_dir() and match:
            found.append((int(match.group(1)), match.group(2), child))
    return sorted(found)


def _has_rwku_files(folder: Path) -> bool:
    names = {name for name, _ in PROBE_FILES.values()} | set(TEXT_FILES.values()) | {"intro.json"}
    return any((folder / name).is_file() for name in names)


def _target_name(folder: Path, fallback: str) -> str:
    intro = folder / "intro.json"
    if intro.is_file():
        for number, record in read_records(intro):
            if "target" in record:
                return require_text(record, "target", intro, number)
    return fallback.replace("_", " ")


def _read_probes(path: Path, level: str, default_target: str | None) -> list[Probe]:
    probes = []
    for number, record in read_records(path):
        query = require_text(record, "query", path, number)
        answer = require_field(record, "answer", path, number)
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise RetainFirstError(f"{path}: record {number} field 'answer' must be a non-empty string")
        target = record.get("subject") or default_target
        if not target:
            raise RetainFirstError(f"{path}: record {number} has no field 'subject' naming its target")
        record_level = str(record.get("level", level)).strip()
        if record_level != level:
            raise RetainFirstError(
                f"{path}: record {number} field 'level' = {record_level!r}, expected {level!r} for this file"
            )
        kind = record.get("type") or ""
        probes.append(Probe(prompt=query, answer=answer, level=level, target=str(target), kind=str(kind)))
    return probes


def _read_texts(path: Path, default_target: str | None) -> dict[str, list[str]]:
    by_target: dict[str, list[str]] = {}
    for number, record in read_records(path):
        text = require_text(record, "text", path, number)
        target = record.get("subject") or default_target
        if not target:
            raise RetainFirstError(f"{path}: record {number} has no field 'subject' naming its target")
        by_target.setdefault(str(target), []).append(text)
    return by_target


def _load_folder(folder: Path, default_target: str | None, data: RWKUData) -> None:
    """Add the files of one folder (a target folder, or the combined ``All`` folder) to ``data``."""
    for key, (name, level) in PROBE_FILES.items():
        path = folder / name
        if path.is_file() or path.is_symlink():  # a dangling link is an error, not a missing file
            data.probes.setdefault(key, []).extend(_read_probes(path, level, default_target))
        else:
            logger.info("%s: no %s", folder, name)
    for attribute, name in TEXT_FILES.items():
        path = folder / name
        if not path.is_file() and not path.is_symlink():
            logger.info("%s: no %s", folder, name)
            continue
        table = getattr(data, attribute)
        for target, texts in _read_texts(path, default_target).items():
            table.setdefault(target, []).extend(texts)


def _combined_targets(folder: Path, data: RWKUData) -> list[str]:
    intro = folder / "intro.json"
    order: list[str] = []
    if intro.is_file():
        order = [require_text(r, "target", intro, n) for n, r in read_records(intro)]
    seen = set(order)
    for probes in data.probes.values():
        for probe in probes:
            if probe.target not in seen:
                seen.add(probe.target)
                order.append(probe.target)
    for target in data.passages:
        if target not in seen:
            seen.add(target)
            order.append(target)
    return order


def _select_targets(all_targets: list[str], targets: Sequence[str | int] | str | None) -> list[str]:
    if targets is None:
        return list(all_targets)
    if isinstance(targets, str):
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", targets)
        if not match:
            targets = [targets]
        else:
            first, last = int(match.group(1)), int(match.group(2))
            targets = list(range(first, last + 1))
    chosen = []
    for target in targets:
        if isinstance(target, int):
            if not 1 <= target <= len(all_targets):
                raise RetainFirstError(f"RWKU target number {target} is out of range 1-{len(all_targets)}")
            chosen.append(all_targets[target - 1])
        elif target in all_targets:
            chosen.append(target)
        else:
            sample = ", ".join(all_targets[:5])
            raise RetainFirstError(f"unknown RWKU target {target!r}; known targets include: {sample}, ...")
    return chosen


def load_rwku(folder: str | Path, targets: Sequence[str | int] | str | None = None) -> RWKUData:
    """Load RWKU from a local folder, optionally only some targets.

    ``targets``: None (all), names (``"Stephen King"``), 1-based benchmark numbers, or a range string
    ``"1-50"`` (the paper's batch setting).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise RetainFirstError(f"{folder}: RWKU folder not found")
    data = RWKUData(targets=[])
    target_root = folder / "Target" if (folder / "Target").is_dir() else folder
    target_dirs = _target_folders(target_root)
    if target_dirs:
        for _, raw_name, path in target_dirs:
            name = _target_name(path, raw_name)
            data.targets.append(name)
            _load_folder(path, name, data)
    else:
        combined = folder / "All" if (folder / "All").is_dir() else folder
        if not _has_rwku_files(combined):
            raise RetainFirstError(
                f"{folder}: no RWKU files; expected Target/<i>_<Name>/forget_level1.json (per target) "
                "or All/forget_level1.json (combined)"
            )
        match = _TARGET_DIR.match(combined.name)
        default = _target_name(combined, match.group(2)) if match else None
        _load_folder(combined, default, data)
        data.targets = [default] if default else _combined_targets(combined, data)
    if not data.targets:
        raise RetainFirstError(f"{folder}: RWKU files hold no targets")
    selected = _select_targets(data.targets, targets)
    keep = set(selected)
    return RWKUData(
        targets=selected,
        passages={t: v for t, v in data.passages.items() if t in keep},
        probes={k: [p for p in v if p.target in keep] for k, v in data.probes.items()},
        mia_forget={t: v for t, v in data.mia_forget.items() if t in keep},
        mia_retain={t: v for t, v in data.mia_retain.items() if t in keep},
    )
