"""Packaging: ranges in pyproject.toml, the exact tested set in constraints.txt, install scripts, and
the FSDP2 accelerate config that replaces DeepSpeed ZeRO (docs/deepspeed.md)."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from retainfirst.engine import TrainConfig
from retainfirst.engine.loop import check_accelerator
from retainfirst.errors import RetainFirstError

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FLOORS_TESTED = ("transformers", "accelerate", "peft")


def _requirements(group=None):
    items = PROJECT["dependencies"] if group is None else PROJECT["optional-dependencies"][group]
    return [Requirement(item) for item in items]


def _constraints():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_runtime_dependencies_are_ranges_with_lower_bounds():
    for req in _requirements():
        operators = {spec.operator for spec in req.specifier}
        assert "==" not in operators, f"{req} is pinned; pyproject.toml holds ranges (pins: constraints.txt)"
        assert ">=" in operators, f"{req} has no lower bound"


def test_constraints_pin_every_dependency_inside_its_range():
    pins = _constraints()
    for group in (None, "dev", "hub", "lm-eval"):
        for req in _requirements(group):
            name = canonicalize_name(req.name)
            if name == "torch":  # installed by scripts/install.sh as the CPU build
                continue
            assert name in pins, f"constraints.txt has no pin for {req.name}"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{req.name}=={pins[name]} not in {req}"
            )
    install = (ROOT / "scripts" / "install.sh").read_text()
    torch_pin = re.search(r"install torch==([\d.]+)", install).group(1)
    torch_req = next(r for r in _requirements() if r.name == "torch")
    assert torch_req.specifier.contains(torch_pin)
    assert "torch" not in pins and "retainfirst" not in pins


def test_lower_bound_script_reads_the_floors_ci_tests():
    script = (ROOT / "scripts" / "lower_bounds.sh").read_text()
    assert all(name in script for name in FLOORS_TESTED)
    floors = {r.name: r for r in _requirements() if r.name in FLOORS_TESTED}
    assert sorted(floors) == sorted(FLOORS_TESTED)
    assert "lower_bounds.sh" in (ROOT / ".ci" / "run").read_text()


def test_install_script_refuses_an_unknown_option_before_creating_a_venv(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "install.sh", tmp_path / "scripts" / "install.sh")
    done = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "install.sh"), "--bogus"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "install.sh: unknown option --bogus (use --dev, --ranges)"
    assert not (tmp_path / ".venv").exists()


def test_fsdp2_accelerate_config_gives_an_fsdp2_plugin(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "retainfirst.cli", "run"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)  # what `accelerate launch` exports to each process
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_refusal_points_to_the_fsdp2_migration(kind):
    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(value=kind))
    with pytest.raises(RetainFirstError) as error:
        check_accelerator(accelerator, TrainConfig())
    message = str(error.value)
    assert (
        "\n" not in message and "docs/deepspeed.md" in message and "configs/accelerate/fsdp2.yaml" in message
    )
    doc = (ROOT / "docs" / "deepspeed.md").read_text()
    assert "configs/accelerate/fsdp2.yaml" in doc and "accelerate launch --config_file" in doc
