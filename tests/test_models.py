"""Loading local model folders safely (issue 14): no remote code without the flag, damaged files named."""

from __future__ import annotations

import json

import pytest

from retainfirst.errors import RetainFirstError
from retainfirst.models import build_byte_tokenizer, build_tiny_llama, load_model


@pytest.fixture
def tiny_folder(tmp_path):
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_a_model_with_its_own_code_is_refused_without_the_flag(tiny_folder, tmp_path):
    marker = tmp_path / "ran"
    config = json.loads((tiny_folder / "config.json").read_text())
    config.pop("model_type")
    config["auto_map"] = {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (tiny_folder / "config.json").write_text(json.dumps(config))
    (tiny_folder / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    with pytest.raises(RetainFirstError) as info:
        load_model(str(tiny_folder))
    message = str(info.value)
    assert "\n" not in message and "trust_remote_code: true" in message and "Python" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("config.json", b"[1, 2]"),  # was a TypeError deep inside transformers
        ("config.json", b""),
        ("tokenizer.json", b"\xff\xfe\x00"),
        ("tokenizer_config.json", b'{"truncated'),
        ("model.safetensors", b"\x00" * 7),
    ],
)
def test_a_damaged_file_is_named_in_one_line(tiny_folder, name, data):
    (tiny_folder / name).write_bytes(data)
    with pytest.raises(RetainFirstError) as info:
        load_model(str(tiny_folder))
    assert "\n" not in str(info.value) and str(tiny_folder / name) in str(info.value)


def test_a_damaged_pytorch_bin_is_one_line(tiny_folder):
    (tiny_folder / "model.safetensors").unlink()
    (tiny_folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(RetainFirstError, match="damaged"):
        load_model(str(tiny_folder))
