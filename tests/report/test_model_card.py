"""Model card (README.md with Hub front matter) of a saved model folder, and --push-to-hub, offline."""

import pytest
import yaml

from retainfirst import cli
from retainfirst.config import load_config, plan_runs
from retainfirst.data import download
from retainfirst.engine.loop import save_model
from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.report import model_card

WMDP_OVERRIDES = [
    "name=wmdp_bio_demo",
    "model=HuggingFaceH4/zephyr-7b-beta",
    "synthesizers=[sum,pcgrad]",
    "data.source=corpus",
    "data.dir=data/wmdp",
    "data.forget=bio-forget-corpus.jsonl",
    "data.retain=bio-retain-corpus.jsonl",
    "train.forget_loss=npo",
    "train.forget_kwargs={beta: 0.1}",
    "train.gamma=0.5",
    "train.steps=7",
    "eval.tasks=[wmdp_bio,mmlu]",
]


def _card_parts(text):
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def _results():
    before = [
        EvalResult("wmdp_bio", {"acc": 0.625, "acc_stderr": 0.01}, 8, {"shots": 0, "mode": "letter"}),
        EvalResult("mmlu", {"acc": 0.5}, 16, {"shots": 5, "mode": "letter", "limit": 16}),
    ]
    after = [
        EvalResult("wmdp_bio", {"acc": 0.25, "acc_stderr": 0.01}, 8, {"shots": 0, "mode": "letter"}),
        EvalResult("mmlu", {"acc": 0.4375}, 16, {"shots": 5, "mode": "letter", "limit": 16}),
    ]
    return before, after


def test_card_of_full_weights(tmp_path, tiny_model, byte_tokenizer):
    config = load_config(None, WMDP_OVERRIDES)
    sub = plan_runs(config)[1]
    folder = tmp_path / "model"
    save_model(tiny_model, byte_tokenizer, folder)
    assert (folder / "model.safetensors").is_file()
    before, after = _results()
    path = model_card.write_model_card(folder, config, sub, after, before=before)
    assert path == folder / "README.md"
    header, body = _card_parts(path.read_text())
    assert header == {
        "base_model": "HuggingFaceH4/zephyr-7b-beta",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["unlearning", "retainfirst", "pcgrad", "npo"],
        "datasets": ["cais/wmdp", "cais/mmlu"],
    }
    assert "| wmdp_bio | acc | 0.6250 | 0.2500 | 8 | shots=0, mode=letter |" in body
    assert "| mmlu | acc | 0.5000 | 0.4375 | 16 | shots=5, mode=letter, limit=16 |" in body
    assert "acc_stderr" not in body
    assert "- forget loss: `npo` (beta=`0.1`), weight gamma = `0.5`" in body
    assert "- synthesizer: `pcgrad` (family `pcgrad`)" in body
    assert "- forget: `bio-forget-corpus.jsonl`" in body and "- steps: `7`" in body
    assert "Weights: full weights in safetensors." in body


def test_card_of_lora_adapters_and_of_merged_weights(tmp_path, tiny_model, byte_tokenizer):
    from peft import LoraConfig, get_peft_model

    config = load_config(None, [*WMDP_OVERRIDES, "train.lora={r: 2}"])
    sub = plan_runs(config)[0]
    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapters = tmp_path / "adapters"
    save_model(peft_model, byte_tokenizer, adapters)
    header, body = _card_parts(model_card.write_model_card(adapters, config, sub, []).read_text())
    assert header["library_name"] == "peft" and header["tags"][-1] == "lora"
    assert "LoRA adapters (`adapter_model.safetensors`" in body and "AutoPeftModelForCausalLM" in body
    assert "No evaluation was run." in body

    merged_config = load_config(None, [*WMDP_OVERRIDES, "train.lora={r: 2}", "train.merge_lora=true"])
    merged = tmp_path / "merged"
    save_model(peft_model, byte_tokenizer, merged, merge_lora=True)
    assert not (merged / "adapter_config.json").exists()
    text = model_card.write_model_card(merged, merged_config, plan_runs(merged_config)[0], []).read_text()
    header, body = _card_parts(text)
    assert header["library_name"] == "transformers"
    assert "(LoRA adapters merged into the base weights)" in body


def test_local_base_model_has_no_base_model_field(tmp_path):
    config = load_config(None, ["model=./my/local/model"])
    header, _ = _card_parts(model_card.render_model_card(config, plan_runs(config)[0], []))
    assert "base_model" not in header


def test_card_needs_the_model_folder(tmp_path):
    config = load_config(None, [])
    with pytest.raises(RetainFirstError, match="save_final_model"):
        model_card.write_model_card(tmp_path / "missing", config, plan_runs(config)[0], [])


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    monkeypatch.setattr(model_card, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    monkeypatch.setattr(model_card, "create_repo", lambda **kw: calls.append(("create", kw)))
    monkeypatch.setattr(download, "check_network", lambda *a, **k: None)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    return calls


def _saved_with_card(tmp_path, tiny_model, byte_tokenizer):
    config = load_config(None, WMDP_OVERRIDES)
    folder = tmp_path / "model"
    save_model(tiny_model, byte_tokenizer, folder)
    model_card.write_model_card(folder, config, plan_runs(config)[0], [])
    return folder


def test_push_uploads_the_folder(tmp_path, tiny_model, byte_tokenizer, fake_hub):
    folder = _saved_with_card(tmp_path, tiny_model, byte_tokenizer)
    assert model_card.push_to_hub(folder, "me/unlearned") == "https://huggingface.co/me/unlearned"
    assert [name for name, _ in fake_hub] == ["create", "upload"]
    upload = fake_hub[1][1]
    assert upload["repo_id"] == "me/unlearned" and upload["folder_path"] == str(folder)
    assert upload["token"] == "hf_test" and upload["repo_type"] == "model"
    assert model_card.repo_for_run("me/x", "sago", 1) == "me/x"
    assert model_card.repo_for_run("me/x", "sago", 3) == "me/x-sago"


def test_push_errors_are_one_line(tmp_path, tiny_model, byte_tokenizer, fake_hub, monkeypatch):
    folder = _saved_with_card(tmp_path, tiny_model, byte_tokenizer)
    with pytest.raises(RetainFirstError, match="owner/name"):
        model_card.push_to_hub(folder, "no-owner")
    (folder / "README.md").unlink()
    with pytest.raises(RetainFirstError, match=r"no README\.md model card"):
        model_card.push_to_hub(folder, "me/x")
    model_card.write_model_card(folder, load_config(None, []), plan_runs(load_config(None, []))[0], [])

    def refuse(**kwargs):
        raise PermissionError("403 Forbidden: no write access\nmore detail")

    monkeypatch.setattr(model_card, "upload_folder", refuse)
    with pytest.raises(RetainFirstError, match=r"^upload to me/x failed: 403 Forbidden: no write access$"):
        model_card.push_to_hub(folder, "me/x")
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(RetainFirstError, match="needs a Hugging Face token"):
        model_card.push_to_hub(folder, "me/x")


def test_cli_push_without_token_fails_before_training(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert cli.main(["run", "--push-to-hub", "me/model", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "retainfirst: error: --push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`"
    ]
    assert list(tmp_path.iterdir()) == []
