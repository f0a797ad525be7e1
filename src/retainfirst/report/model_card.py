"""The Hub model card (``README.md`` with YAML front matter) of a saved unlearned model, and its upload.

:func:`write_model_card` describes one sub-run's ``model/`` folder: base model, forget and retain
data, objectives, synthesizer and its options, training settings, and the evaluation table before and
after with each task's protocol (shots, scoring mode, limit). The folder itself is what
``save_pretrained`` wrote: ``model.safetensors`` (full or LoRA-merged weights) or
``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA adapters on the base model).
:func:`push_to_hub` uploads such a folder with ``huggingface_hub.upload_folder``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retainfirst.errors import RetainFirstError
from retainfirst.io import atomic_write_text

if TYPE_CHECKING:
    from retainfirst.config import RunConfig, SubRun
    from retainfirst.evals.results import EvalResult

CARD = "README.md"
TAGS = ("unlearning", "retainfirst")
# Hub datasets of the benchmarks retainfirst reads (data.source, eval task prefix or data folder name).
HUB_DATASETS = {
    "tofu": "locuslab/TOFU",
    "rwku": "jinzhuoran/RWKU",
    "wmdp": "cais/wmdp",
    "muse-news": "muse-bench/MUSE-News",
    "muse-books": "muse-bench/MUSE-Books",
    "mmlu": "cais/mmlu",
}
PROTOCOL_KEYS = ("shots", "mode", "mcq_mode", "limit", "prompt", "template", "split", "max_new_tokens")


def weights_kind(folder: Path) -> str:
    """``lora`` (adapters only), ``full`` (safetensors weights) or ``none`` (nothing saved yet)."""
    if (folder / "adapter_config.json").is_file():
        return "lora"
    if any(folder.glob("*.safetensors")):
        return "full"
    return "none"


def _datasets(config: RunConfig) -> list[str]:
    keys = [config.data.source]
    keys += [str(t).split(":")[0].split("_")[0] for t in config.eval.tasks]
    folder = Path(config.data.dir or "").name.lower()
    keys += [name for name in ("muse-news", "muse-books") if name == folder]
    if "muse" in keys:
        corpus = getattr(config.eval, "muse_corpus", None) or "news"
        keys.append(f"muse-{corpus}")
    return list(dict.fromkeys(HUB_DATASETS[k] for k in keys if k in HUB_DATASETS))


def _yaml_list(name: str, values: Sequence[str]) -> list[str]:
    return [f"{name}:", *(f"- {json.dumps(v)}" for v in values)] if values else []


def _is_hub_id(model: str) -> bool:
    return model.count("/") == 1 and not Path(model).exists() and not model.startswith((".", "/", "~"))


def front_matter(config: RunConfig, sub_run: SubRun, kind: str) -> str:
    """The card's YAML header: the fields the Hub reads (base_model, library_name, tags, datasets)."""
    train = sub_run.train
    tags = list(
        dict.fromkeys([*TAGS, sub_run.family, train.forget_loss, *(["lora"] if kind == "lora" else [])])
    )
    lines = ["---"]
    if _is_hub_id(config.model):
        lines.append(f"base_model: {json.dumps(config.model)}")
    lines.append(f"library_name: {'peft' if kind == 'lora' else 'transformers'}")
    lines.append("pipeline_tag: text-generation")
    lines += _yaml_list("tags", tags)
    lines += _yaml_list("datasets", _datasets(config))
    lines.append("---")
    return "\n".join(lines) + "\n"


def _kv(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_kv(v)}" for k, v in value.items()) or "defaults"
    if isinstance(value, list | tuple):
        return ", ".join(_kv(v) for v in value)
    return f"`{value}`"


def _data_lines(config: RunConfig) -> list[str]:
    data = config.data
    fields: dict[str, Any] = {"source": data.source, "folder": data.dir}
    if data.source == "corpus":
        fields |= {"forget": data.forget, "retain": data.retain, "text field": data.text_field}
    elif data.source == "rwku":
        fields |= {"forget targets": data.rwku_forget_targets, "retain targets": data.rwku_retain_targets}
    elif data.source == "tofu":
        fields |= {"forget split": data.tofu_split, "prompt template": data.tofu_template}
    else:
        fields |= {"forget facts": data.n_forget, "retain facts": data.n_retain, "benchmark": data.benchmark}
    fields |= {"max length (tokens)": data.max_length, "packed": data.pack}
    return [f"- {k}: {_kv(v)}" for k, v in fields.items() if v is not None]


def _train_lines(config: RunConfig, sub_run: SubRun) -> tuple[list[str], list[str], list[str]]:
    t = sub_run.train
    objectives = [
        f"- forget loss: `{t.forget_loss}` ({_kv(t.forget_kwargs)}), weight gamma = `{t.gamma}`",
        f"- retain loss: `{t.retain_loss}` ({_kv(t.retain_kwargs)}), weight alpha = `{t.alpha}`",
    ]
    synthesis = [
        f"- synthesizer: `{t.synthesizer}` (family `{sub_run.family}`)",
        f"- options: {_kv(t.synthesizer_options)}",
    ]
    if sub_run.settings:
        synthesis.append(f"- sweep settings of this run: {_kv(sub_run.settings)}")
    settings = {
        "epochs": getattr(config, "epochs", None),
        "steps": t.steps,
        "learning rate": t.lr,
        "schedule": f"{t.lr_schedule}, warmup "
        + (f"{t.warmup_steps} steps" if t.warmup_steps is not None else f"ratio {t.warmup_ratio}"),
        "optimizer": f"{t.optimizer} (betas {tuple(t.betas)}, eps {t.adam_eps}, "
        f"weight decay {t.weight_decay})",
        "batch (per device, forget / retain)": f"{t.forget_batch_size} / {t.retain_batch_size}",
        "gradient accumulation": t.gradient_accumulation_steps,
        "max grad norm": t.max_grad_norm,
        "mixed precision": t.mixed_precision,
        "seed": t.seed,
        "LoRA": t.lora if t.lora is not None else "none (full fine-tuning)",
        "merged LoRA": t.merge_lora if t.lora is not None else None,
        "trainable parameters": t.trainable_patterns,
    }
    training = [
        f"- {k}: {_kv(v) if not isinstance(v, str) else v}" for k, v in settings.items() if v is not None
    ]
    return objectives, synthesis, training


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def _protocol(result: EvalResult) -> str:
    settings = result.settings or {}
    parts = [f"{k}={settings[k]}" for k in PROTOCOL_KEYS if settings.get(k) is not None]
    return ", ".join(parts) or "defaults"


def eval_table(results: Sequence[EvalResult], before: Sequence[EvalResult] | None = None) -> list[str]:
    """Markdown rows: task, metric, before, after, n, protocol (one row per headline metric)."""
    if not results:
        return ["No evaluation was run."]
    earlier = {r.task: r for r in before or []}
    rows = ["| task | metric | before | after | n | protocol |", "| --- | --- | --- | --- | --- | --- |"]
    for result in results:
        base = earlier.get(result.task)
        for metric, value in result.metrics.items():
            if metric.endswith("_stderr"):
                continue
            old = base.metrics.get(metric) if base is not None else None
            cells = [result.task, metric, _fmt(old), _fmt(value), str(result.n), _protocol(result)]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def _usage(config: RunConfig, kind: str) -> list[str]:
    if kind == "lora":
        code = [
            "from peft import AutoPeftModelForCausalLM",
            'model = AutoPeftModelForCausalLM.from_pretrained("REPO_OR_FOLDER")  # base model + adapters',
        ]
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("REPO_OR_FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("REPO_OR_FOLDER")',
        ]
    return ["```python", *code, "```"]


def render_model_card(
    config: RunConfig,
    sub_run: SubRun,
    results: Sequence[EvalResult],
    *,
    before: Sequence[EvalResult] | None = None,
    kind: str = "full",
) -> str:
    """The card's text (front matter + Markdown body)."""
    objectives, synthesis, training = _train_lines(config, sub_run)
    weights = {
        "lora": "LoRA adapters (`adapter_model.safetensors`, `adapter_config.json`) on the base model",
        "full": "full weights in safetensors"
        + (" (LoRA adapters merged into the base weights)" if sub_run.train.merge_lora else ""),
        "none": "no weights in this folder yet",
    }[kind]
    title = f"{config.name}: {sub_run.name}"
    base = (
        f"[`{config.model}`](https://huggingface.co/{config.model})"
        if _is_hub_id(config.model)
        else (f"`{config.model}`")
    )
    body = [
        f"# {title}",
        "",
        f"{base} after machine unlearning with [retainfirst](https://pypi.org/project/retainfirst/): the "
        "forget gradient and the retain gradient are computed separately at each step and combined by "
        f"the `{sub_run.train.synthesizer}` synthesizer.",
        "",
        f"Weights: {weights}.",
        "",
        "## Forget and retain data",
        *_data_lines(config),
        "",
        "## Objectives",
        *objectives,
        "",
        "## Synthesizer",
        *synthesis,
        "",
        "## Training",
        *training,
        "",
        "## Evaluation",
        "Before: the base model; after: this model. Protocol columns give the settings each task used "
        "(few-shot examples, MCQ scoring mode, item limit).",
        "",
        *eval_table(results, before),
        "",
        "## Use",
        *_usage(config, kind),
        "",
    ]
    return front_matter(config, sub_run, kind) + "\n" + "\n".join(body)


def write_model_card(
    out_dir: str | Path,
    config: RunConfig,
    sub_run: SubRun,
    results: Sequence[EvalResult],
    *,
    before: Sequence[EvalResult] | None = None,
) -> Path:
    """Write ``out_dir/README.md`` (``out_dir``: the model folder ``save_pretrained`` wrote)."""
    folder = Path(out_dir)
    if not folder.is_dir():
        raise RetainFirstError(f"{folder}: no saved model folder; set train.save_final_model: true")
    text = render_model_card(config, sub_run, results, before=before, kind=weights_kind(folder))
    return atomic_write_text(folder / CARD, text)


# ----------------------------------------------------------------------------------------------
# Upload


def upload_folder(**kwargs: Any) -> Any:
    """``huggingface_hub.upload_folder`` (a seam the tests replace)."""
    from huggingface_hub import upload_folder as hub_upload_folder

    return hub_upload_folder(**kwargs)


def create_repo(**kwargs: Any) -> Any:
    from huggingface_hub import create_repo as hub_create_repo

    return hub_create_repo(**kwargs)


def _token(token: str | None) -> str | None:
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    return get_token()


def check_push(repo: str, token: str | None = None) -> str:
    """Before training: the repo id is well formed, a token exists and the hub answers; returns the token."""
    from retainfirst.data.download import check_network

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise RetainFirstError(f"--push-to-hub {repo!r}: give the repository as owner/name")
    found = _token(token)
    if not found:
        raise RetainFirstError(
            "--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`"
        )
    check_network()
    return found


def push_to_hub(folder: str | Path, repo: str, token: str | None = None, *, private: bool = True) -> str:
    """Upload a saved model folder (with its README.md card) to model repository ``repo``; returns its URL."""
    folder = Path(folder)
    if not folder.is_dir() or weights_kind(folder) == "none":
        raise RetainFirstError(f"{folder}: no saved weights to upload; set train.save_final_model: true")
    if not (folder / CARD).is_file():
        raise RetainFirstError(f"{folder}: no {CARD} model card; write it with write_model_card first")
    found = check_push(repo, token)
    try:
        create_repo(repo_id=repo, token=found, private=private, exist_ok=True, repo_type="model")
        upload_folder(
            repo_id=repo,
            folder_path=str(folder),
            token=found,
            repo_type="model",
            commit_message="Upload unlearned model (retainfirst)",
        )
    except Exception as exc:  # auth, permissions, network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetainFirstError(f"upload to {repo} failed: {first[:200]}") from None
    return f"https://huggingface.co/{repo}"


def repo_for_run(repo: str, run_name: str, n_runs: int) -> str:
    """The repository one sub-run's model goes to: ``repo`` itself for a single run, else ``repo-<run>``."""
    return repo if n_runs == 1 else f"{repo}-{run_name}"
