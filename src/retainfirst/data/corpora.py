"""Text corpora for forgetting and retaining: loading, tokenising, packing and batching.

Sources (:func:`load_texts`): JSONL (one object per line, text in ``field``), JSON (an array of objects
or of strings), Parquet, plain text, or a Hugging Face dataset id (needs the ``hub`` extra and a
network connection). Plain text files hold **one document per blank-line-separated block**, which
keeps multi-line paragraphs together; pass ``txt_split="line"`` for one document per line.

Tokenisation (:func:`tokenize_texts`) follows the WMDP corpora set-up: documents are concatenated,
each followed by eos, and cut into ``max_length`` chunks. The incomplete last chunk is **dropped**
(every training chunk then has the same length, as in the reference set-up) unless it is the only
chunk, in which case it is kept so that a tiny corpus still yields one example; ``keep_tail=True``
always keeps it. ``pack=False`` keeps documents separate, each truncated to ``max_length``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from retainfirst.errors import RetainFirstError
from retainfirst.io import read_user_text

logger = logging.getLogger(__name__)

Example = dict[str, torch.Tensor]
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
TEXT_SUFFIXES = (".txt", ".text", ".md")


# ----------------------------------------------------------------------------------------------
# Reading records


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(record_number, record)`` from a JSONL, JSON or Parquet file.

    The record number is 1-based: the line for JSONL (blank lines are skipped but counted), the
    position in the array for JSON, the row for Parquet. Every error names the file and the record.
    """
    path = Path(path)
    if not path.is_file():
        _raise_unreadable(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise RetainFirstError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _data_text(path: Path) -> str:
    """A data file's text; unreadable, non-UTF-8 or dangling-link files are one-line errors."""
    return read_user_text(path, "data file", fix="fix the file or point the config to the right one")


def _raise_unreadable(path: Path) -> None:
    """The error for a path that is not a readable file (missing, a dangling link, a folder)."""
    if path.is_symlink() or path.is_dir():
        _data_text(path)  # raises, naming the link target or the folder
    raise RetainFirstError(f"{path}: no such file")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    seen = False
    for line_number, line in enumerate(_data_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RetainFirstError(
                f"{path}: record {line_number} (line {line_number}) is not valid JSON ({exc.msg}); "
                "fix or remove that line"
            ) from None
        if not isinstance(record, dict):
            raise RetainFirstError(
                f"{path}: record {line_number} (line {line_number}) is a {type(record).__name__}, "
                "expected a JSON object"
            )
        seen = True
        yield line_number, record
    if not seen:
        raise RetainFirstError(f"{path}: file is empty (no JSON lines)")


def _read_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _data_text(path)
    if not text.strip():
        raise RetainFirstError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RetainFirstError(
            f"{path}: not valid JSON at line {exc.lineno} ({exc.msg}); a .json file must hold one array"
        ) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers
    if not isinstance(data, list):
        raise RetainFirstError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    if not data:
        raise RetainFirstError(f"{path}: file holds an empty array")
    for number, record in enumerate(data, start=1):
        if isinstance(record, str):
            record = {"text": record}
        if not isinstance(record, dict):
            raise RetainFirstError(
                f"{path}: record {number} is a {type(record).__name__}, expected an object or a string"
            )
        yield number, record


def _read_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for broken files
        raise RetainFirstError(f"{path}: cannot read Parquet file ({exc})") from None
    if table.num_rows == 0:
        raise RetainFirstError(f"{path}: Parquet file has no rows")
    yield from enumerate(table.to_pylist(), start=1)


def require_field(record: dict[str, Any], field: str, path: Path | str, number: int) -> Any:
    """Return ``record[field]`` or raise an error naming file, record and field."""
    if field not in record or record[field] is None:
        present = ", ".join(sorted(map(str, record))) or "none"
        raise RetainFirstError(f"{path}: record {number} has no field {field!r} (fields present: {present})")
    return record[field]


def require_text(record: dict[str, Any], field: str, path: Path | str, number: int) -> str:
    value = require_field(record, field, path, number)
    if not isinstance(value, str):
        raise RetainFirstError(
            f"{path}: record {number} field {field!r} is a {type(value).__name__}, expected a string"
        )
    return value


# ----------------------------------------------------------------------------------------------
# Loading texts


def load_texts(
    path_or_id: str | Path,
    field: str = "text",
    *,
    txt_split: str = "blank_line",
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
    skip_empty: bool = True,
) -> list[str]:
    """Load documents from a local file (jsonl | json | parquet | txt) or a Hugging Face dataset id.

    Args:
        path_or_id: a file, or a dataset id such as ``"wikitext"`` / ``"owner/name"`` (online only).
        field: the record field holding the text.
        txt_split: for plain text, ``"blank_line"`` (one document per blank-line-separated block) or
            ``"line"`` (one per line).
        split, config: Hugging Face split and configuration name.
        limit: keep the first ``limit`` documents.
        skip_empty: drop documents that are empty after stripping (logged), instead of failing.
    """
    path = Path(path_or_id)
    if path.is_symlink() and not path.exists():
        _raise_unreadable(path)
    if path.is_dir():
        raise RetainFirstError(
            f"{path} is a folder; pass a file (.jsonl, .json, .parquet, .txt) or use load_wmdp_corpus"
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            texts = _split_plain_text(path, txt_split)
        elif suffix in RECORD_SUFFIXES:
            texts = [require_text(rec, field, path, number) for number, rec in read_records(path)]
        else:
            raise RetainFirstError(
                f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .txt"
            )
        source = str(path)
    else:
        if path.suffix.lower() in (*RECORD_SUFFIXES, *TEXT_SUFFIXES) or str(path_or_id).startswith(
            (".", "/")
        ):
            _raise_unreadable(path)
        texts = _load_hub_texts(str(path_or_id), field, split=split, config=config)
        source = f"hub:{path_or_id}"
    if skip_empty:
        kept = [t for t in texts if t.strip()]
        if len(kept) < len(texts):
            logger.info("%s: skipped %d empty documents", source, len(texts) - len(kept))
        texts = kept
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise RetainFirstError(f"{source}: no documents found (field {field!r})")
    return texts


def _split_plain_text(path: Path, txt_split: str) -> list[str]:
    text = _data_text(path)
    if txt_split == "line":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if txt_split != "blank_line":
        raise RetainFirstError(f"txt_split={txt_split!r} is not valid; choose 'blank_line' or 'line'")
    blocks: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    if not blocks:
        raise RetainFirstError(f"{path}: file is empty")
    return blocks


def load_hub_dataset(dataset_id: str, config: str | None, split: str) -> Any:
    """One split of a Hugging Face dataset; a missing hub extra or a failed load is a one-line error."""
    try:
        import datasets
    except ImportError:
        raise RetainFirstError(
            f"{dataset_id!r} is not a local path; loading it from the Hugging Face hub needs the hub extra: "
            "pip install 'retainfirst[hub]'"
        ) from None
    try:
        return datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:  # offline, unknown id, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"config {config!r}, split {split!r}" if config else f"split {split!r}"
        raise RetainFirstError(f"could not load dataset {dataset_id!r} ({where}): {first}") from None


def _load_hub_texts(dataset_id: str, field: str, *, split: str, config: str | None) -> list[str]:
    dataset = load_hub_dataset(dataset_id, config, split)
    if field not in dataset.column_names:
        raise RetainFirstError(
            f"dataset {dataset_id!r} has no field {field!r}; columns: {', '.join(dataset.column_names)}"
        )
    return [str(t) for t in dataset[field]]


WMDP_DOMAINS = ("bio", "cyber")
WMDP_KINDS = ("forget", "retain")


def load_wmdp_corpus(
    folder: str | Path, domain: str, kind: str, *, field: str = "text", limit: int | None = None
):
    """Load ``{domain}-{kind}-corpus.jsonl`` (WMDP corpora layout) from ``folder``.

    ``folder`` may also hold ``.json`` / ``.parquet`` versions of the same name.
    """
    if domain not in WMDP_DOMAINS:
        raise RetainFirstError(
            f"WMDP domain {domain!r} is not valid; choose one of {', '.join(WMDP_DOMAINS)}"
        )
    if kind not in WMDP_KINDS:
        raise RetainFirstError(
            f"WMDP corpus kind {kind!r} is not valid; choose one of {', '.join(WMDP_KINDS)}"
        )
    folder = Path(folder)
    stem = f"{domain}-{kind}-corpus"
    for suffix in RECORD_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return load_texts(candidate, field=field, limit=limit)
    raise RetainFirstError(
        f"{folder}: no {stem}.jsonl (or .json/.parquet); download the WMDP corpora into that folder"
    )


# ----------------------------------------------------------------------------------------------
# Tokenising and batching


def _encode(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def _example(ids: Sequence[int], loss_mask: Sequence[int] | None = None) -> Example:
    example = {
        "input_ids": torch.tensor(list(ids), dtype=torch.long),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
    }
    if loss_mask is not None:
        example["loss_mask"] = torch.tensor(list(loss_mask), dtype=torch.long)
    return example


def read_raw_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a local file, verbatim (a JSONL line keeps its JSON syntax).

    This is how the paper's released code reads the WMDP corpora (``data.jsonl_as_raw_text``).
    """
    path = Path(path)
    if not path.is_file():
        if path.suffix or str(path).startswith((".", "/")):
            _raise_unreadable(path)
        raise RetainFirstError(f"{path}: data.jsonl_as_raw_text reads local files only, not hub ids")
    lines = [line.rstrip("\r") for line in _data_text(path).split("\n") if line.strip()]
    if not lines:
        raise RetainFirstError(f"{path}: file is empty")
    return lines


JOIN_MODES = ("eos", "blank_line")


def tokenize_texts(
    texts: Sequence[str],
    tokenizer,
    max_length: int = 512,
    pack: bool = True,
    add_eos: bool = True,
    *,
    keep_tail: bool = False,
    join: str = "eos",
    bos_per_chunk: bool = False,
) -> list[Example]:
    """Tokenise documents into examples (dicts of 1-D LongTensors ``input_ids``, ``attention_mask``).

    ``pack=True``: concatenate the documents (each followed by eos when ``add_eos``) and cut the
    stream into ``max_length`` chunks; the short tail is dropped unless it is the only chunk or
    ``keep_tail``. ``pack=False``: one example per document, truncated to ``max_length``. The
    tokenizer's own special tokens (e.g. a Llama BOS) are kept at the start of each document.

    The released code of the paper packs differently, selected by two switches (``pack=True`` only):
    ``join="blank_line"`` joins the documents with a blank line into one text (no eos, no per-document
    special tokens) before tokenizing, and ``bos_per_chunk=True`` starts every chunk with the BOS
    token followed by ``max_length - 1`` stream tokens (the stream then carries no special tokens).
    """
    if isinstance(texts, str):
        raise RetainFirstError("tokenize_texts expects a list of documents, got a single string")
    if max_length < 1:
        raise RetainFirstError(f"max_length must be >= 1, got {max_length}")
    if not texts:
        raise RetainFirstError("tokenize_texts got no documents")
    if join not in JOIN_MODES:
        raise RetainFirstError(f"join={join!r} is not valid; choose one of {', '.join(JOIN_MODES)}")
    bos = tokenizer.bos_token_id
    if bos_per_chunk and (bos is None or max_length < 2):
        raise RetainFirstError("bos_per_chunk needs a tokenizer with a bos token and max_length >= 2")
    eos = tokenizer.eos_token_id
    if join == "blank_line" and pack:
        stream = _encode(tokenizer, ["\n\n".join(texts)], add_special_tokens=False)[0]
    else:
        if add_eos and eos is None:
            raise RetainFirstError("add_eos=True but the tokenizer has no eos token; pass add_eos=False")
        documents = _encode(tokenizer, texts, add_special_tokens=not (pack and bos_per_chunk))
        if add_eos:
            documents = [[*ids, eos] for ids in documents]
        if not pack:
            return [_example(ids[:max_length]) for ids in documents if ids]
        stream = [token for ids in documents for token in ids]
    size = max_length - 1 if bos_per_chunk else max_length
    chunks = [stream[start : start + size] for start in range(0, len(stream), size)]
    if len(chunks) > 1 and len(chunks[-1]) < size and not keep_tail:
        logger.debug("dropped a short tail of %d tokens", len(chunks[-1]))
        chunks.pop()
    return [_example([bos, *chunk] if bos_per_chunk else chunk) for chunk in chunks if chunk]


def tokenize_pairs(
    prompts: Sequence[str],
    answers: Sequence[str],
    tokenizer,
    max_length: int = 512,
    *,
    add_eos: bool = True,
) -> list[Example]:
    """Prompt/answer examples whose ``loss_mask`` is 1 only on the answer tokens (and its eos).

    The pair is tokenised as one string so the answer's tokens are exactly those the model sees after
    the prompt; when the tokenizer merges across the boundary, prompt and answer are encoded
    separately instead. Too-long pairs lose prompt tokens from the left first, then answer tokens
    from the right.
    """
    if len(prompts) != len(answers):
        raise RetainFirstError(f"tokenize_pairs: {len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise RetainFirstError("tokenize_pairs got no pairs")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise RetainFirstError("add_eos=True but the tokenizer has no eos token; pass add_eos=False")
    prompt_ids = _encode(tokenizer, prompts)
    whole_ids = _encode(tokenizer, [p + a for p, a in zip(prompts, answers, strict=True)])
    examples = []
    for index, (prompt, answer, whole) in enumerate(zip(prompt_ids, answers, whole_ids, strict=True)):
        if whole[: len(prompt)] == prompt:
            answer_ids = whole[len(prompt) :]
        else:
            answer_ids = _encode(tokenizer, [answer], add_special_tokens=False)[0]
        if add_eos:
            answer_ids = [*answer_ids, eos]
        if not answer or not answer_ids:
            raise RetainFirstError(f"tokenize_pairs: answer {index + 1} is empty; every pair needs an answer")
        answer_ids = answer_ids[:max_length]
        kept_prompt = prompt[max(0, len(prompt) - (max_length - len(answer_ids))) :]
        ids = kept_prompt + answer_ids
        examples.append(_example(ids, [0] * len(kept_prompt) + [1] * len(answer_ids)))
    return examples


def collate(examples: Sequence[Example], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one: ``input_ids``, ``attention_mask``, ``loss_mask`` [B, T].

    ``loss_mask`` is the example's own one where given (answer tokens), else its attention mask, and
    always 0 on padding. The pad id only fills space: masks, not ids, mark what is real.
    """
    if not examples:
        raise RetainFirstError("collate got an empty list of examples")
    pad = 0 if pad_token_id is None else int(pad_token_id)
    length = 0
    for number, example in enumerate(examples, start=1):
        if "input_ids" not in example:
            raise RetainFirstError(f"collate: example {number} has no 'input_ids'")
        ids = example["input_ids"]
        if ids.ndim != 1 or ids.numel() == 0:
            raise RetainFirstError(f"collate: example {number} input_ids must be a non-empty 1-D tensor")
        for key in ("attention_mask", "loss_mask"):
            if key in example and example[key].shape != ids.shape:
                raise RetainFirstError(f"collate: example {number} {key} does not match input_ids in length")
        length = max(length, ids.numel())
    batch_size = len(examples)
    input_ids = torch.full((batch_size, length), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    loss_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = example["input_ids"].numel()
        input_ids[row, :n] = example["input_ids"]
        attn = example.get("attention_mask")
        attention_mask[row, :n] = 1 if attn is None else attn
        own = example.get("loss_mask")
        loss_mask[row, :n] = attention_mask[row, :n] if own is None else own * attention_mask[row, :n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
