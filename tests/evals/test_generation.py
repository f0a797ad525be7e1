from __future__ import annotations

import pytest
import torch

from retainfirst.data.probes import Probe
from retainfirst.errors import RetainFirstError
from retainfirst.evals.generation import (
    ANSWER_CUE,
    _answer_text,
    _NewlineStop,
    evaluate_generation,
    format_prompt,
    generate_greedy,
    is_fill_in_the_blank,
    make_rouge_scorer,
    resolve_prompt_format,
    rouge_l_recall,
)

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_tokenizer(byte_tokenizer, monkeypatch):
    monkeypatch.setattr(byte_tokenizer, "chat_template", TEMPLATE, raising=False)
    return byte_tokenizer


def test_rouge_l_recall_known_strings():
    assert rouge_l_recall("Paris", "Paris") == 1.0
    assert rouge_l_recall("Shakespeare", "William Shakespeare") == 0.5
    assert rouge_l_recall("Berlin", "Paris") == 0.0
    # LCS "Paris France" out of 2 gold words; extra generated words do not lower recall
    assert rouge_l_recall("It is Paris in France", "Paris France") == 1.0
    assert rouge_l_recall("France then Paris", "Paris France") == 0.5


def test_rwku_tokenization_is_case_sensitive_and_splits_on_periods():
    rwku, library = make_rouge_scorer("rwku"), make_rouge_scorer("rouge_score")
    assert rouge_l_recall("paris", "Paris", rwku) == 0.0
    assert rouge_l_recall("paris", "Paris", library) == 1.0
    assert rouge_l_recall("Paris.", "Paris", rwku) == 1.0
    assert rouge_l_recall("Paris,", "Paris", rwku) == 0.0
    assert rouge_l_recall("Paris,", "Paris", library) == 1.0
    with pytest.raises(RetainFirstError, match="rouge_tokenization"):
        make_rouge_scorer("bleu")


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("1", True),
        ("level1", True),
        ("forget_fb", True),
        ("fb", True),
        ("2", False),
        ("forget_qa", False),
        ("3", False),
        ("neighbor_l2", False),
    ],
)
def test_fill_in_the_blank_levels(level, expected):
    assert is_fill_in_the_blank(level) is expected


def test_chat_prompt_mirrors_rwku(chat_tokenizer):
    blank = Probe("Paris is the capital of ___.", "France", "1", "Paris")
    question = Probe("What is the capital of France?", "Paris", "2", "Paris")
    suffix = Probe(
        "What is the capital of France? Sure, here is", "Paris", "3", "Paris", "affirmative suffix"
    )
    assert format_prompt(blank, chat_tokenizer, "chat") == (
        "<|user|>Please complete the blank in the following question.\n"
        "Question: Paris is the capital of ___.\n<|assistant|>" + ANSWER_CUE
    )
    assert format_prompt(question, chat_tokenizer, "chat") == (
        "<|user|>Please briefly answer the following question.\n"
        "Question: What is the capital of France?\n<|assistant|>Answer:"
    )
    assert format_prompt(suffix, chat_tokenizer, "chat").endswith("Sure, here is<|assistant|>")
    assert format_prompt(question, chat_tokenizer, "raw") == "What is the capital of France?"


def test_prompt_format_resolution(chat_tokenizer):
    assert resolve_prompt_format(chat_tokenizer, "auto") == "chat"
    assert resolve_prompt_format(chat_tokenizer, "raw") == "raw"
    with pytest.raises(RetainFirstError, match="prompt_format"):
        resolve_prompt_format(chat_tokenizer, "instruct")


def test_chat_format_needs_a_template(byte_tokenizer, tiny_model):
    assert not getattr(byte_tokenizer, "chat_template", None)
    assert resolve_prompt_format(byte_tokenizer, "auto") == "raw"
    with pytest.raises(RetainFirstError, match="chat template"):
        evaluate_generation(tiny_model, byte_tokenizer, [Probe("q", "a", "1", "t")], prompt_format="chat")


def test_answer_text_cuts_at_eos_and_newline(byte_tokenizer):
    ids = byte_tokenizer(" Paris\nFrance")["input_ids"]
    eos = byte_tokenizer.eos_token_id
    assert _answer_text(byte_tokenizer, ids, [eos], stop_at_newline=True) == "Paris"
    assert _answer_text(byte_tokenizer, ids, [eos], stop_at_newline=False) == "Paris\nFrance"
    assert _answer_text(byte_tokenizer, [*ids[:3], eos, *ids[3:]], [eos], True) == "Pa"
    leading = byte_tokenizer("\nParis")["input_ids"]
    assert _answer_text(byte_tokenizer, leading, [eos], stop_at_newline=True) == ""


def test_newline_stop_is_per_row(byte_tokenizer):
    prompt = byte_tokenizer(["ab", "cd"])["input_ids"]
    rows = [prompt[0] + byte_tokenizer("x\n")["input_ids"], prompt[1] + byte_tokenizer("yz")["input_ids"]]
    done = _NewlineStop(byte_tokenizer, prompt_length=2)(torch.tensor(rows), None)
    assert done.tolist() == [True, False]


def test_batched_generation_equals_unbatched(tiny_model, byte_tokenizer):
    prompts = ["The capital of France is", "Hi", "Who wrote Hamlet? A:"]
    byte_tokenizer.padding_side = "right"
    tiny_model.train()
    batched = generate_greedy(
        tiny_model, byte_tokenizer, prompts, max_new_tokens=6, batch_size=3, stop_at_newline=False
    )
    single = [
        generate_greedy(
            tiny_model, byte_tokenizer, [p], max_new_tokens=6, batch_size=1, stop_at_newline=False
        )[0]
        for p in prompts
    ]
    assert batched == single
    assert any(batched)
    assert byte_tokenizer.padding_side == "right"
    assert tiny_model.training


def test_evaluate_generation_scores_and_breakdown(tiny_model, byte_tokenizer):
    probes = [
        Probe("Paris is the capital of", "France", "1", "Paris"),
        Probe("Name a color:", "blue", "2", "colors"),
        Probe("Two plus two is", "four", "2", "math"),
    ]
    result = evaluate_generation(
        tiny_model,
        byte_tokenizer,
        probes,
        task="probe_test",
        max_new_tokens=5,
        batch_size=2,
        prompt_format="raw",
    )
    generated = generate_greedy(tiny_model, byte_tokenizer, [p.prompt for p in probes], max_new_tokens=5)
    assert [s["generated"] for s in result.samples] == generated
    scores = [rouge_l_recall(g, p.answer) for g, p in zip(generated, probes, strict=True)]
    assert [s["score"] for s in result.samples] == scores
    assert result.task == "probe_test" and result.n == 3
    assert result.metrics["rougeL_recall"] == pytest.approx(sum(scores) / 3)
    assert result.breakdown["2"]["n"] == 2.0
    assert result.breakdown["2"]["rougeL_recall"] == pytest.approx((scores[1] + scores[2]) / 2)
    level_mean = (scores[0] + (scores[1] + scores[2]) / 2) / 2
    assert result.metrics["rougeL_recall_level_mean"] == pytest.approx(level_mean)
    assert result.settings["prompt_format"] == "raw" and result.settings["max_new_tokens"] == 5


def test_evaluate_generation_rejects_bad_probes(tiny_model, byte_tokenizer):
    with pytest.raises(RetainFirstError, match="no probes"):
        evaluate_generation(tiny_model, byte_tokenizer, [])
    with pytest.raises(RetainFirstError, match="probe 1"):
        evaluate_generation(tiny_model, byte_tokenizer, [Probe("a", "b", "1", ""), Probe("c", " ", "1", "")])


@pytest.mark.slow
def test_smollm2_answers_known_facts_in_rwku_chat_format(smollm2):
    model, tokenizer = smollm2
    padding_side = tokenizer.padding_side
    probes = [
        Probe("The capital of France is ___.", "Paris", "1", "France"),
        Probe("What is the capital of Germany?", "Berlin", "2", "Germany"),
    ]
    result = evaluate_generation(model, tokenizer, probes, task="facts", batch_size=2)
    assert result.settings["prompt_format"] == "chat"
    assert result.settings["prompt_example"].endswith("<|im_start|>assistant\nAnswer:")
    assert result.metrics["rougeL_recall"] == 1.0, result.samples
    assert tokenizer.padding_side == padding_side


SHARED_PREFIX = (
    "System: you are a helpful assistant.\nPlease briefly answer the following question.\nQuestion: "
)
SUFFIXES = ["What is the capital of France?", "Hi", "Who wrote Hamlet? Answer:", "2+2=", "Name a color"]


@pytest.fixture
def float64_model(byte_tokenizer):
    from retainfirst.models import build_tiny_llama

    return build_tiny_llama(len(byte_tokenizer), seed=0, dtype=torch.float64)


def forward_shapes(model):
    """Records the input_ids shape of every model forward (the hook handle removes it)."""
    shapes: list[tuple[int, ...]] = []

    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    return shapes, model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("stop_at_newline", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, len(SUFFIXES)])
def test_shared_prefix_gives_the_plain_answers(float64_model, byte_tokenizer, batch_size, stop_at_newline):
    assert byte_tokenizer.pad_token_id == byte_tokenizer.eos_token_id
    prompts = [SHARED_PREFIX + suffix for suffix in SUFFIXES]
    options = {"max_new_tokens": 8, "batch_size": batch_size, "stop_at_newline": stop_at_newline}
    plain = generate_greedy(float64_model, byte_tokenizer, prompts, share_prefix=False, **options)
    shapes, hook = forward_shapes(float64_model)
    shared = generate_greedy(float64_model, byte_tokenizer, prompts, **options)
    hook.remove()
    assert shared == plain
    assert len(set(plain)) > 1
    prefix_length = len(byte_tokenizer(SHARED_PREFIX)["input_ids"])
    # the prefix runs once (batch 1), then every batch's prefill feeds only the tokens after it
    assert shapes[0] == (1, prefix_length)
    assert sum(1 for shape in shapes if shape[0] == 1 and shape[1] >= prefix_length) == 1
    prefills = [shape for shape in shapes if shape[1] > 1 and shape != shapes[0]]
    longest_suffix = max(len(byte_tokenizer(s, add_special_tokens=False)["input_ids"]) for s in SUFFIXES)
    assert prefills and all(width <= longest_suffix for _, width in prefills)


def test_shared_prefix_with_pad_as_eos_and_early_stops(float64_model, byte_tokenizer):
    # the model's favourite first tokens become end-of-sequence/newline: rows stop at different steps
    prompts = [SHARED_PREFIX + suffix for suffix in SUFFIXES]
    first = generate_greedy(float64_model, byte_tokenizer, prompts, max_new_tokens=1, share_prefix=False)
    newline = byte_tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        bias = torch.zeros(float64_model.config.vocab_size, dtype=torch.float64)
        bias[newline] = bias[byte_tokenizer.eos_token_id] = 0.5
        float64_model.lm_head.bias = torch.nn.Parameter(bias)
    for stop_at_newline in (True, False):
        options = {"max_new_tokens": 10, "batch_size": 5, "stop_at_newline": stop_at_newline}
        plain = generate_greedy(float64_model, byte_tokenizer, prompts, share_prefix=False, **options)
        assert generate_greedy(float64_model, byte_tokenizer, prompts, **options) == plain
    assert first  # the plain path ran


def test_no_common_prefix_falls_back_to_plain_batches(float64_model, byte_tokenizer):
    prompts = ["The capital of France is", "Hi", "Who wrote Hamlet? A:"]
    plain = generate_greedy(float64_model, byte_tokenizer, prompts, max_new_tokens=6, share_prefix=False)
    shapes, hook = forward_shapes(float64_model)
    shared = generate_greedy(float64_model, byte_tokenizer, prompts, max_new_tokens=6)
    hook.remove()
    assert shared == plain
    longest = max(len(byte_tokenizer(p)["input_ids"]) for p in prompts)
    assert shapes[0] == (3, longest)


def test_short_common_prefix_or_zero_minimum_runs_plain(float64_model, byte_tokenizer):
    prompts = [SHARED_PREFIX + suffix for suffix in SUFFIXES[:3]]
    longest = max(len(byte_tokenizer(p)["input_ids"]) for p in prompts)
    for options in ({"min_shared_prefix": 0}, {"min_shared_prefix": 500}, {"share_prefix": False}):
        shapes, hook = forward_shapes(float64_model)
        generate_greedy(float64_model, byte_tokenizer, prompts, max_new_tokens=2, **options)
        hook.remove()
        assert shapes[0] == (3, longest), options


def test_model_without_plain_cache_falls_back(float64_model, byte_tokenizer, monkeypatch):
    prompts = [SHARED_PREFIX + suffix for suffix in SUFFIXES]
    plain = generate_greedy(float64_model, byte_tokenizer, prompts, max_new_tokens=4, share_prefix=False)
    forward = float64_model.forward

    def forward_without_cache(*args, **kwargs):
        output = forward(*args, **kwargs)
        if kwargs.get("logits_to_keep") == 1 and kwargs["input_ids"].shape[0] == 1:
            output.past_key_values = None  # as a model that returns no cache
        return output

    monkeypatch.setattr(float64_model, "forward", forward_without_cache)
    assert generate_greedy(float64_model, byte_tokenizer, prompts, max_new_tokens=4) == plain
