"""The import-linter contracts of pyproject.toml hold, and they do catch an import against the layers."""

from __future__ import annotations

import pkgutil
import re
import tomllib
from pathlib import Path

import importlinter.api  # noqa: F401  (configures import-linter's readers, as its CLI does)
import pytest
from importlinter.application.use_cases import lint_imports

import retainfirst

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
STAND_IN = "layercheck_pkg"


def lint(config: Path) -> bool:
    """``lint-imports`` on ``config`` without a cache (no files written next to the project)."""
    return lint_imports(config_filename=str(config), cache_dir=None, no_logo=True)


def importlinter_section() -> str:
    """The ``[tool.importlinter]`` tables of pyproject.toml, as text."""
    text = PYPROJECT.read_text(encoding="utf-8")
    start = text.index("[tool.importlinter]")
    end = re.search(r"^\[(?!\[?tool\.importlinter)", text[start + 1 :], flags=re.MULTILINE)
    return text[start : start + 1 + end.start()] if end else text[start:]


def test_contracts_cover_the_issue_rules():
    """The rules the layering promises are configured (guards against a contract quietly deleted)."""
    contracts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    forbidden = {
        source: set(c["forbidden_modules"])
        for c in contracts
        if c["type"] == "forbidden"
        for source in c["source_modules"]
    }
    assert {"retainfirst.evals", "retainfirst.benchmarks", "retainfirst.engine"} <= forbidden[
        "retainfirst.data"
    ]
    assert "retainfirst.benchmarks" in forbidden["retainfirst.evals"]
    independent = [set(c["modules"]) for c in contracts if c["type"] == "independence"]
    assert {"retainfirst.synthesis", "retainfirst.objectives"} in independent
    (layers,) = [c for c in contracts if c["type"] == "layers"]
    assert layers["exhaustive"] and layers["layers"][0] == "cli" and layers["layers"][-1] == "errors"


def test_the_package_keeps_its_import_contracts(capsys):
    assert lint(PYPROJECT), capsys.readouterr().out


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """An empty package with retainfirst's top-level modules, linted with the project's contracts."""
    root = tmp_path / STAND_IN
    root.mkdir()
    (root / "__init__.py").write_text("")
    for module in pkgutil.iter_modules(retainfirst.__path__):
        if module.ispkg:
            (root / module.name).mkdir()
            (root / module.name / "__init__.py").write_text("")
        else:
            (root / f"{module.name}.py").write_text("")
    config = tmp_path / "pyproject.toml"
    config.write_text(importlinter_section().replace("retainfirst", STAND_IN), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return root, config


@pytest.mark.parametrize(
    ("importer", "imported", "broken"),
    [
        ("data/leak.py", "evals.generation", "data is the bottom domain layer"),
        ("evals/leak.py", "benchmarks", "evals never import a benchmark"),
        ("synthesis/leak.py", "objectives", "independent of each other"),
        ("errors.py", "io", "Layers:"),
    ],
)
def test_an_import_against_the_layers_is_caught(stand_in, capsys, importer, imported, broken):
    root, config = stand_in
    if imported == "evals.generation":
        (root / "evals" / "generation.py").write_text("")
    assert lint(config), capsys.readouterr().out  # the empty stand-in keeps every contract
    capsys.readouterr()
    (root / importer).write_text(f"import {STAND_IN}.{imported}\n")
    assert not lint(config)
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(re.escape(broken) + r".*BROKEN", out), out
