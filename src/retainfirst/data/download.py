"""``retainfirst data NAME --dir DIR``: fetch a benchmark from the hub into the layout the loaders read.

Each benchmark is a list of :class:`HubFile`: one split of a hub dataset written to one file under
``DIR`` (the layouts of :mod:`retainfirst.data.mcq`, :mod:`~retainfirst.data.corpora`,
:mod:`~retainfirst.data.rwku`, :mod:`~retainfirst.data.tofu` and :mod:`~retainfirst.data.muse`, and the
file names the bundled ``configs/`` use). After writing, the folder is parsed with those loaders and
``DIR/MANIFEST.json`` records each file's SHA-256, size, source and record count. A second run skips
every file whose checksum still matches, so it downloads nothing and needs no network.

Gated datasets (the WMDP bio forget corpus) are fetched only with a Hugging Face token whose account
accepted the dataset's terms; otherwise they are skipped with a note saying how to get them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from retainfirst.errors import RetainFirstError
from retainfirst.io import atomic_write, atomic_write_json, atomic_write_text, json_safe

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
CONNECT_TIMEOUT_S = 3.0
FORMATS = ("jsonl", "json_array", "parquet")


@dataclass(frozen=True)
class HubFile:
    """One split of a hub dataset (``repo``, ``config``, ``split``) written to ``path`` under DIR."""

    path: str
    repo: str
    config: str | None
    split: str
    fmt: str  # jsonl | json_array | parquet
    gated: bool = False

    @property
    def source(self) -> str:
        return f"{self.repo}:{self.config or 'default'}:{self.split}"


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's files, the folder the bundled configs expect, and how to verify a copy."""

    name: str
    default_dir: str
    files: tuple[HubFile, ...]
    verify: Callable[[Path, set[str]], None]  # (DIR, relative paths present) -> raises on a bad copy
    gated_note: str = ""


# ----------------------------------------------------------------------------------------------
# Verification with the loaders


def _verify_wmdp(folder: Path, present: set[str]) -> None:
    from retainfirst.data.corpora import load_wmdp_corpus
    from retainfirst.data.mcq import load_wmdp_mcq

    for domain in ("bio", "cyber", "chem"):
        if any(p.startswith(f"wmdp-{domain}/") for p in present):
            load_wmdp_mcq(folder, domain)
    for name in sorted(p for p in present if p.endswith("-corpus.jsonl")):
        domain, kind = name.split("-")[:2]
        load_wmdp_corpus(folder, domain, kind, limit=None)


def _verify_rwku(folder: Path, present: set[str]) -> None:
    from retainfirst.data.rwku import load_rwku

    data = load_rwku(folder)
    if not data.probes.get("forget_fb"):
        raise RetainFirstError(f"{folder}: RWKU copy holds no forget probes")


def _verify_tofu(folder: Path, present: set[str]) -> None:
    from retainfirst.data.tofu import FORGET_SPLITS, load_tofu, tofu_training_pairs

    for split in FORGET_SPLITS:
        load_tofu(folder, split)
        tofu_training_pairs(folder, split)


def _verify_muse(folder: Path, present: set[str]) -> None:
    from retainfirst.data.muse import load_muse, load_muse_texts

    load_muse(folder)
    for split in ("forget", "retain1", "retain2", "holdout"):
        load_muse_texts(folder, "raw", split)


# ----------------------------------------------------------------------------------------------
# The benchmarks


def _wmdp() -> Benchmark:
    questions = tuple(
        HubFile(f"wmdp-{d}/test-00000-of-00001.parquet", "cais/wmdp", f"wmdp-{d}", "test", "parquet")
        for d in ("bio", "cyber", "chem")
    )
    corpora = tuple(
        HubFile(f"{name}.jsonl", "cais/wmdp-corpora", name, "train", "jsonl")
        for name in ("bio-retain-corpus", "cyber-forget-corpus", "cyber-retain-corpus")
    )
    bio_forget = HubFile(
        "bio-forget-corpus.jsonl", "cais/wmdp-bio-forget-corpus", None, "train", "jsonl", True
    )
    note = (
        "the WMDP bio forget corpus (cais/wmdp-bio-forget-corpus) is gated: request access on its hub "
        "page, then set HF_TOKEN (or run `hf auth login`) and rerun `retainfirst data wmdp`"
    )
    return Benchmark("wmdp", "data/wmdp", (*questions, *corpora, bio_forget), _verify_wmdp, note)


RWKU_FILES = {  # file under All/ -> (hub config, split): the combined layout of data/rwku.py
    "intro.json": ("forget_target", "train"),
    "forget_level1.json": ("forget_level1", "test"),
    "forget_level2.json": ("forget_level2", "test"),
    "forget_level3.json": ("forget_level3", "test"),
    "neighbor_level1.json": ("neighbor_level1", "test"),
    "neighbor_level2.json": ("neighbor_level2", "test"),
    "passage.json": ("train_original_passage", "train"),
}

TOFU_CONFIGS = (
    "forget01",
    "forget05",
    "forget10",
    "retain90",
    "retain95",
    "retain99",
    "forget01_perturbed",
    "forget05_perturbed",
    "forget10_perturbed",
    "retain_perturbed",
    "real_authors_perturbed",
    "world_facts_perturbed",
)

MUSE_SPLITS = {  # hub config -> splits, written as <config>/<split>-00000-of-00001.parquet (the hub layout)
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "verbmem": ("forget",),
    "knowmem": ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl"),
    "privleak": ("forget", "retain", "holdout"),
}


def _muse(corpus: str) -> Benchmark:
    repo = f"muse-bench/MUSE-{corpus.capitalize()}"
    files = tuple(
        HubFile(f"{config}/{split}-00000-of-00001.parquet", repo, config, split, "parquet")
        for config, splits in MUSE_SPLITS.items()
        for split in splits
        if not (corpus == "books" and config == "knowmem")  # MUSE-Books has no KnowMem retain QA on the hub
    )
    return Benchmark(f"muse-{corpus}", f"data/MUSE-{corpus.capitalize()}", files, _verify_muse)


def benchmarks() -> dict[str, Benchmark]:
    """The benchmarks ``retainfirst data`` knows, by the name on its command line."""
    return {
        "wmdp": _wmdp(),
        "rwku": Benchmark(
            "rwku",
            "data/RWKU",
            tuple(
                HubFile(f"All/{f}", "jinzhuoran/RWKU", c, s, "json_array") for f, (c, s) in RWKU_FILES.items()
            ),
            _verify_rwku,
        ),
        "tofu": Benchmark(
            "tofu",
            "data/TOFU",
            tuple(HubFile(f"{c}.json", "locuslab/TOFU", c, "train", "jsonl") for c in TOFU_CONFIGS),
            _verify_tofu,
        ),
        "muse": _muse("news"),
        "muse-books": _muse("books"),
    }


# ----------------------------------------------------------------------------------------------
# Network and hub access (the two functions tests replace)


def hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return urlparse(endpoint).hostname or "huggingface.co"


def check_network(host: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail at once, in one line, when the hub cannot be reached (offline mode, no DNS, no route)."""
    host = host or hub_host()
    if (
        os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        or os.environ.get("HF_DATASETS_OFFLINE", "") == "1"
    ):
        raise RetainFirstError("HF_HUB_OFFLINE is set; unset it to download, or copy the data in by hand")
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RetainFirstError(
            f"cannot reach {host} ({reason}); retainfirst data needs network access to the Hugging Face hub"
        ) from None


def hub_token() -> str | None:
    """The user's Hugging Face token (HF_TOKEN or a saved login), or None."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()


def fetch_split(repo: str, config: str | None, split: str, token: str | None) -> list[dict[str, Any]]:
    """The records of one split of a hub dataset (needs the ``hub`` extra)."""
    import datasets

    dataset = datasets.load_dataset(repo, config, split=split, token=token)
    return dataset.to_list()


def _require_datasets() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise RetainFirstError(
            "retainfirst data needs the hub extra: pip install 'retainfirst[hub]'"
        ) from None


# ----------------------------------------------------------------------------------------------
# Writing and checking files


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_records(path: Path, records: list[dict[str, Any]], fmt: str) -> None:
    """Write ``records`` atomically as JSON Lines, one JSON array, or Parquet."""
    if not records:
        raise RetainFirstError(f"{path.name}: the hub returned no records")
    if fmt == "jsonl":
        atomic_write_text(path, "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in records))
    elif fmt == "json_array":
        atomic_write_text(path, json.dumps(json_safe(records), ensure_ascii=False, indent=1) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(records)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable: every file is checked again from scratch
    return data if isinstance(data, dict) else {}


def is_verified(folder: Path, spec: HubFile, entry: Any) -> bool:
    """The file is there, non-empty, from the same source and with the checksum the manifest recorded."""
    path = folder / spec.path
    if not isinstance(entry, dict) or entry.get("source") != spec.source or not path.is_file():
        return False
    return (
        path.stat().st_size > 0
        and path.stat().st_size == entry.get("bytes")
        and sha256(path) == entry.get("sha256")
    )


@dataclass
class SetupReport:
    """What one ``retainfirst data`` run did."""

    folder: Path
    downloaded: list[str]
    kept: list[str]
    skipped: dict[str, str]  # gated path -> why

    def lines(self) -> list[str]:
        out = [f"{self.folder}: {len(self.downloaded)} file(s) downloaded, {len(self.kept)} already verified"]
        out += [f"skipped {path}: {why}" for path, why in self.skipped.items()]
        return out


def setup_benchmark(
    name: str,
    folder: str | Path | None = None,
    *,
    token: str | None = None,
    log: Callable[[str], None] = print,
) -> SetupReport:
    """Download benchmark ``name`` into ``folder`` (default its ``data/...`` folder), verify it, and
    write ``MANIFEST.json``. Idempotent: verified files are kept and nothing is fetched for them."""
    table = benchmarks()
    if name not in table:
        raise RetainFirstError(f"unknown benchmark {name!r}; choose one of {', '.join(table)}")
    bench = table[name]
    root = Path(folder or bench.default_dir)
    if root.exists() and not root.is_dir():
        raise RetainFirstError(f"--dir {root} is a file; give a folder")
    manifest = read_manifest(root)
    entries: dict[str, Any] = (
        dict(manifest.get("files", {})) if isinstance(manifest.get("files"), dict) else {}
    )
    kept = [f.path for f in bench.files if is_verified(root, f, entries.get(f.path))]
    missing = [f for f in bench.files if f.path not in kept]
    token = token if token is not None else (hub_token() if missing else None)
    skipped: dict[str, str] = {}
    wanted = []
    for spec in missing:
        if spec.gated and not token:
            skipped[spec.path] = bench.gated_note or "gated dataset; set HF_TOKEN"
        else:
            wanted.append(spec)
    downloaded: list[str] = []
    created = not root.exists()
    try:
        _download_and_verify(bench, root, wanted, token, entries, downloaded, skipped, log)
    except BaseException:
        for path in downloaded:  # no half-set-up folder: what this run wrote goes again
            (root / path).unlink(missing_ok=True)
        if created:
            _remove_empty_dirs(root)
        raise
    report = SetupReport(root, downloaded, kept, skipped)
    for line in report.lines():
        log(line)
    return report


def _remove_empty_dirs(root: Path) -> None:
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(path.iterdir()):
            path.rmdir()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def _download_and_verify(
    bench: Benchmark,
    root: Path,
    wanted: list[HubFile],
    token: str | None,
    entries: dict[str, Any],
    downloaded: list[str],
    skipped: dict[str, str],
    log: Callable[[str], None],
) -> None:
    name = bench.name
    if wanted:
        _require_datasets()
        check_network()
        for spec in wanted:
            log(f"fetching {spec.source} -> {root / spec.path}")
            try:
                records = fetch_split(spec.repo, spec.config, spec.split, token)
            except RetainFirstError:
                raise
            except Exception as exc:  # gated, renamed upstream, network dropped
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if spec.gated:
                    skipped[spec.path] = f"{first[:160]}; {bench.gated_note}"
                    continue
                raise RetainFirstError(f"cannot download {spec.source}: {first[:200]}") from None
            write_records(root / spec.path, records, spec.fmt)
            entries[spec.path] = {"source": spec.source, "records": len(records)}
            downloaded.append(spec.path)
    present = {f.path for f in bench.files if (root / f.path).is_file() and f.path not in skipped}
    if not present:
        raise RetainFirstError(f"{root}: nothing to verify; every file of {name} was skipped")
    bench.verify(root, present)
    for path in sorted(present):
        entry = dict(entries.get(path) or {})
        file = root / path
        entry.update(bytes=file.stat().st_size, sha256=sha256(file))
        entry.setdefault("source", next(f.source for f in bench.files if f.path == path))
        entries[path] = entry
    atomic_write_json(root / MANIFEST, {"benchmark": name, "files": {k: entries[k] for k in sorted(present)}})


def benchmark_names() -> Iterable[str]:
    return benchmarks().keys()
