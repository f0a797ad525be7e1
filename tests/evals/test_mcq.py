"""MCQ scoring: exact prompts, brute-force agreement (letter and option), padding, prefix sharing."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from retainfirst.data import MCQuestion
from retainfirst.errors import RetainFirstError
from retainfirst.evals import mcq
from retainfirst.evals.mcq import _stderr, build_prompt, evaluate_mcq, select_fewshot
from retainfirst.models import build_tiny_llama

QUESTIONS = [
    MCQuestion(" What is 2+2? ", ["3", "4", "5", "22"], 1, "elementary_mathematics"),
    MCQuestion("Which is a prime?", ["9", "15", "7", "21"], 2, "elementary_mathematics"),
    MCQuestion("Pick the vowel.", ["b", "e", "k", "z"], 1, "english_grammar"),
    MCQuestion("Opposite of hot?", ["warm", "cold and icy", "red", "big"], 1, "english_grammar"),
    MCQuestion("H2O is?", ["salt", "iron", "water", "gold"], 2, "high_school_chemistry"),
    MCQuestion("3*3?", ["9", "6", "33", "1"], 0, "elementary_mathematics"),
    MCQuestion("Sky colour?", ["green", "blue", "red", "black"], 1, "english_grammar"),
    MCQuestion("Ten minus one?", ["8", "1", "11", "9"], 3, "elementary_mathematics"),
]


def letter_tokenizer():
    """Byte-level BPE where " A".." D" are single tokens, as in GPT-2 style vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("Ġ", letter) for letter in "ABCD"]
    for first, second in merges:
        vocab[first + second] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture
def small_model(byte_tokenizer):
    """A 2-layer Llama over bytes: brute-force loops stay fast on a shared CPU."""
    return build_tiny_llama(
        len(byte_tokenizer), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )


@pytest.fixture(scope="module")
def single_token_setup():
    tokenizer = letter_tokenizer()
    assert len(tokenizer(" A")["input_ids"]) == 1
    model = build_tiny_llama(
        len(tokenizer), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1
    )
    model.eval()
    return model, tokenizer


def brute_force(model, tokenizer, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt) with one unbatched, unpadded forward (lm-eval's tokenisation)."""
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + continuation)["input_ids"]
    cont = whole[len(context) :]
    with torch.no_grad():
        logits = model(torch.tensor([context + cont])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(cont))


def test_prompt_zero_shot_exact():
    assert build_prompt(QUESTIONS[0]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    )


def test_prompt_one_shot_exact():
    assert build_prompt(QUESTIONS[1], [QUESTIONS[0]]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer: B\n\n"
        "Which is a prime?\nA. 9\nB. 15\nC. 7\nD. 21\nAnswer:"
    )


def test_fewshot_from_pool_takes_first_k_of_subject_and_sampling_excludes_self():
    pool = [MCQuestion(f"dev{i}", ["a", "b", "c", "d"], 0, "english_grammar") for i in range(3)]
    pool.append(MCQuestion("devm", ["a", "b", "c", "d"], 0, "elementary_mathematics"))
    shots = select_fewshot(QUESTIONS[2:4], 2, pool)
    assert shots == [pool[:2], pool[:2]]
    without_chemistry = [q for q in QUESTIONS if q.subject != "high_school_chemistry"]
    sampled = select_fewshot(without_chemistry, 2, seed=5)
    for question, examples in zip(without_chemistry, sampled, strict=True):
        assert len(examples) == 2
        assert all(e.subject == question.subject and e is not question for e in examples)
    assert sampled == select_fewshot(without_chemistry, 2, seed=5)
    with pytest.raises(RetainFirstError, match="high_school_chemistry"):
        select_fewshot(QUESTIONS, 1)


@pytest.mark.parametrize("shots", [0, 2])
def test_letter_mode_single_token_matches_brute_force(single_token_setup, shots):
    model, tokenizer = single_token_setup
    questions = [q for q in QUESTIONS if q.subject != "high_school_chemistry"]
    result = evaluate_mcq(model, tokenizer, questions, shots=shots, batch_size=3, seed=1)
    assert result.settings["multi_token_fallback"] == 0
    fewshot = select_fewshot(questions, shots, None, 1)
    for question, examples, sample in zip(questions, fewshot, result.samples, strict=True):
        prompt = build_prompt(question, examples)
        expected = [brute_force(model, tokenizer, prompt, " " + letter) for letter in "ABCD"]
        assert sample["scores"] == pytest.approx(expected, abs=1e-4)
        assert sample["pred"] == max(range(4), key=expected.__getitem__)


def test_letter_mode_multi_token_letters_match_brute_force(byte_tokenizer, small_model):
    # Byte tokenizer: " A" is two tokens (" ", "A"); still one sequence per question.
    result = evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, batch_size=4)
    for question, sample in zip(QUESTIONS, result.samples, strict=True):
        expected = [brute_force(small_model, byte_tokenizer, build_prompt(question), " " + c) for c in "ABCD"]
        assert sample["scores"] == pytest.approx(expected, abs=1e-4)
    assert result.metrics["acc"] == pytest.approx(sum(s["correct"] for s in result.samples) / len(QUESTIONS))


def test_option_mode_matches_brute_force_and_normalises_by_characters(single_token_setup):
    model, tokenizer = single_token_setup
    result = evaluate_mcq(model, tokenizer, QUESTIONS, mode="option", batch_size=5)
    hits, norm_hits = [], []
    for question, sample in zip(QUESTIONS, result.samples, strict=True):
        prompt = build_prompt(question)
        expected = [brute_force(model, tokenizer, prompt, " " + choice) for choice in question.choices]
        assert sample["scores"] == pytest.approx(expected, abs=1e-4)
        hits.append(max(range(4), key=expected.__getitem__) == question.answer)
        normed = [v / len(c) for v, c in zip(expected, question.choices, strict=True)]
        norm_hits.append(max(range(4), key=normed.__getitem__) == question.answer)
    assert result.metrics["acc"] == pytest.approx(sum(hits) / len(hits))
    assert result.metrics["acc_norm"] == pytest.approx(sum(norm_hits) / len(norm_hits))


@pytest.mark.parametrize("mode", ["letter", "option"])
def test_scores_do_not_depend_on_batch_size(byte_tokenizer, small_model, mode):
    one = evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, mode=mode, batch_size=1)
    seven = evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, mode=mode, batch_size=7)
    for a, b in zip(one.samples, seven.samples, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
        assert a["pred"] == b["pred"]
    assert one.metrics == seven.metrics


@pytest.fixture
def count_shared(monkeypatch):
    """Records the group size of every shared-prefix run."""
    calls = []
    original = mcq._Scorer._run_shared

    def counting(self, requests, indices, prefix_length, results):
        calls.append(len(indices))
        return original(self, requests, indices, prefix_length, results)

    monkeypatch.setattr(mcq._Scorer, "_run_shared", counting)
    return calls


@pytest.mark.parametrize("batch_size", [1, 3, 7])
@pytest.mark.parametrize("letters", ["multi_token", "single_token"])
def test_shared_fewshot_prefix_gives_the_same_scores(
    byte_tokenizer, small_model, single_token_setup, count_shared, batch_size, letters
):
    model, tokenizer = (small_model, byte_tokenizer) if letters == "multi_token" else single_token_setup
    # Ragged suffixes (questions of different lengths) share each subject's 2-shot block; batch 7
    # leaves a partial, padded batch; batch 1 reuses the same prefix cache for every question.
    questions = [q for q in QUESTIONS if q.subject != "high_school_chemistry"] * 2
    pool = [MCQuestion(f"dev {i}?", ["a", "bb", "c", "d"], i, q.subject) for i, q in enumerate(QUESTIONS[:4])]
    kwargs = {"shots": 2, "fewshot_pool": pool, "batch_size": batch_size}
    shared = evaluate_mcq(model, tokenizer, questions, share_prefix=True, **kwargs)
    assert sorted(count_shared) == [6, 8]  # one prefix per subject (3 and 4 questions, twice)
    assert shared.settings["shared_prefix_groups"] == 2
    full = evaluate_mcq(model, tokenizer, questions, share_prefix=False, **kwargs)
    assert len(count_shared) == 2 and full.settings["shared_prefix_groups"] == 0
    fewshot = select_fewshot(questions, 2, pool)
    for question, examples, a, b in zip(questions, fewshot, shared.samples, full.samples, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
        expected = [brute_force(model, tokenizer, build_prompt(question, examples), " " + c) for c in "ABCD"]
        assert a["scores"] == pytest.approx(expected, abs=1e-4)
    assert shared.metrics == full.metrics


def test_auto_sharing_only_for_fewshot_letter_mode_and_large_subjects(
    byte_tokenizer, small_model, count_shared
):
    big = [q for q in QUESTIONS if q.subject == "elementary_mathematics"]  # 4 questions: shared
    small = [q for q in QUESTIONS if q.subject == "english_grammar"][:1]  # a lone question: plain
    questions = big + small
    dev_subjects = big + [q for q in QUESTIONS if q.subject == "english_grammar"][:3]
    pool = [
        MCQuestion(f"dev {i}?", ["a", "b", "c", "d"], i % 4, q.subject) for i, q in enumerate(dev_subjects)
    ]
    auto = evaluate_mcq(small_model, byte_tokenizer, questions, shots=2, fewshot_pool=pool, batch_size=3)
    assert mcq.AUTO_MIN_GROUP == 2 and count_shared == [len(big)]
    assert auto.settings["share_prefix"] == "auto" and auto.settings["shared_prefix_groups"] == 1
    evaluate_mcq(small_model, byte_tokenizer, questions, shots=0, batch_size=3)
    evaluate_mcq(small_model, byte_tokenizer, questions, mode="option", shots=2, fewshot_pool=pool)
    assert len(count_shared) == 1  # neither 0-shot nor option mode shares by default
    plain = evaluate_mcq(
        small_model, byte_tokenizer, questions, shots=2, fewshot_pool=pool, share_prefix=False
    )
    for a, b in zip(auto.samples, plain.samples, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    with pytest.raises(RetainFirstError, match="share_prefix must be True, False or 'auto'"):
        evaluate_mcq(small_model, byte_tokenizer, questions, share_prefix="yes")


def test_result_metrics_breakdown_and_settings(byte_tokenizer, small_model):
    result = evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, task="wmdp_bio", limit=6, seed=3)
    assert result.task == "wmdp_bio"
    assert result.n == 6
    correct = [float(s["correct"]) for s in result.samples]
    p = sum(correct) / 6
    assert result.metrics["acc"] == pytest.approx(p)
    assert result.metrics["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 5))
    assert set(result.breakdown) == {q.subject for q in QUESTIONS[:6]}
    assert sum(b["n"] for b in result.breakdown.values()) == 6
    math_hits = [
        c for c, q in zip(correct, QUESTIONS[:6], strict=True) if q.subject == "elementary_mathematics"
    ]
    assert result.breakdown["elementary_mathematics"]["acc"] == pytest.approx(sum(math_hits) / len(math_hits))
    for key in ("mode", "shots", "prompt_format", "n", "limit", "seed", "batch_size", "fewshot_source"):
        assert key in result.settings
    assert result.settings["limit"] == 6
    assert small_model.training  # the caller's mode is restored


def test_stderr_formula():
    values = [1.0, 0.0, 1.0, 1.0]
    assert _stderr(values) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert math.isnan(_stderr([1.0]))


def test_malformed_inputs(byte_tokenizer, small_model):
    with pytest.raises(RetainFirstError, match="mode 'logits' is not valid"):
        evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, mode="logits")
    with pytest.raises(RetainFirstError, match="no questions"):
        evaluate_mcq(small_model, byte_tokenizer, [])
    with pytest.raises(RetainFirstError, match="shots must be >= 0"):
        evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, shots=-1)
    with pytest.raises(RetainFirstError, match="batch_size must be >= 1"):
        evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, batch_size=0)
    bad = MCQuestion("Q?", ["a", "b", "c", "d"], 4, "x")
    with pytest.raises(RetainFirstError, match="question 2 has answer 4 for 4 choices"):
        evaluate_mcq(small_model, byte_tokenizer, [QUESTIONS[0], bad])
    with pytest.raises(RetainFirstError, match="expected MCQuestion"):
        evaluate_mcq(small_model, byte_tokenizer, [{"question": "Q?"}])
    with pytest.raises(RetainFirstError, match="fewer than shots=5"):
        evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, shots=5, fewshot_pool=QUESTIONS[:2])


def test_batches_cap_each_rows_padding_and_the_batch_size(monkeypatch):
    monkeypatch.setattr(mcq, "MAX_ROW_PADDING", 0.05)
    lengths = [50, 100, 94, 99, 49, 96, 48, 47]
    requests = [mcq._Request(list(range(n)), [n - 1], []) for n in lengths]
    scorer = mcq._Scorer.__new__(mcq._Scorer)
    scorer.batch_size = 3
    batches = scorer._batches(list(range(len(requests))), requests)
    assert [[lengths[i] for i in batch] for batch in batches] == [[100, 99, 96], [94], [50, 49, 48], [47]]
    for batch in batches:
        longest = len(requests[batch[0]].ids)
        assert all(len(requests[i].ids) >= (1 - mcq.MAX_ROW_PADDING) * longest for i in batch)


def test_padding_cap_changes_batches_not_scores(byte_tokenizer, small_model, monkeypatch):
    forwards = []
    handle = small_model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        kwargs = {"batch_size": 16, "share_prefix": False}
        capped = evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, **kwargs)
        capped_forwards = len(forwards)
        assert mcq.MAX_ROW_PADDING == 0.1
        monkeypatch.setattr(mcq, "MAX_ROW_PADDING", 1.0)  # fixed batches of 16, as lm-eval
        full = evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, **kwargs)
    finally:
        handle.remove()
    assert len(forwards) - capped_forwards == 1 < capped_forwards  # the cap did split the batch
    for a, b in zip(capped.samples, full.samples, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


@pytest.fixture
def two_threads():
    """Two intra-op threads for the test (the default streams need them), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("mode", "shots"), [("letter", 0), ("letter", 2), ("option", 0)])
def test_streams_give_the_same_scores_and_restore_the_thread_count(
    byte_tokenizer, small_model, two_threads, mode, shots
):
    questions = [q for q in QUESTIONS if q.subject != "high_school_chemistry"] * 2  # two subjects
    pool = [MCQuestion(f"dev {i}?", ["a", "bb", "c", "d"], i, q.subject) for i, q in enumerate(QUESTIONS[:4])]
    kwargs = {"mode": mode, "shots": shots, "fewshot_pool": pool, "batch_size": 1, "share_prefix": shots > 0}
    results = {
        n: evaluate_mcq(small_model, byte_tokenizer, questions, streams=n, **kwargs) for n in (1, 2, 3)
    }
    assert torch.get_num_threads() == 2
    for n, result in results.items():
        assert result.settings["streams"] == n
        assert result.settings["shared_prefix_groups"] == (2 if shots else 0)
        for a, b in zip(result.samples, results[1].samples, strict=True):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
            assert a["pred"] == b["pred"]
    assert evaluate_mcq(small_model, byte_tokenizer, QUESTIONS).settings["streams"] == mcq.CPU_STREAMS


def test_stream_workers_keep_inference_mode_the_linear_backend_and_their_thread_share(
    byte_tokenizer, small_model, two_threads
):
    from retainfirst.evals.cpu_linear import onednn_available

    seen = []

    def record(module, args):
        modes = torch.overrides._get_current_function_mode_stack()
        seen.append(
            (
                threading.current_thread().name,
                torch.is_inference_mode_enabled(),
                torch.get_num_threads(),
                len(modes),
            )
        )

    handle = small_model.register_forward_pre_hook(record)
    try:
        result = evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, batch_size=1, streams=2)
    finally:
        handle.remove()
    workers = [entry for entry in seen if entry[0].startswith("mcq")]
    assert len(seen) == len(QUESTIONS) and len(workers) == len(QUESTIONS) - 1  # first batch on the caller
    assert all(inference for _, inference, _, _ in seen)
    assert {threads for _, _, threads, _ in workers} == {1}
    assert {modes for _, _, _, modes in seen} == {1 if onednn_available() else 0}
    assert result.settings["linear_backend"] == ("onednn" if onednn_available() else "default")


def test_a_failing_batch_on_a_worker_raises_and_restores_the_thread_count(
    byte_tokenizer, small_model, two_threads, monkeypatch
):
    original = mcq._Scorer._store
    calls = []

    def failing(self, *args):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise FloatingPointError("boom")
        return original(self, *args)

    monkeypatch.setattr(mcq._Scorer, "_store", failing)
    with pytest.raises(FloatingPointError, match="boom"):
        evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, batch_size=1, streams=2)
    assert torch.get_num_threads() == 2


def test_default_streams_only_on_a_cpu_with_enough_threads(small_model, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert mcq._default_streams(small_model) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert mcq._default_streams(small_model) == mcq.CPU_STREAMS
    meta = build_tiny_llama(300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64).to("meta")
    assert mcq._default_streams(meta) == 1


@pytest.mark.parametrize("streams", [0, -1, 1.5, True, "2"])
def test_bad_streams_are_refused(byte_tokenizer, small_model, streams):
    with pytest.raises(RetainFirstError, match="streams must be a positive integer or None"):
        evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, streams=streams)


def test_long_rows_and_shared_prefix_batches_run_one_at_a_time_on_the_caller(
    byte_tokenizer, small_model, two_threads, monkeypatch
):
    names = []
    handle = small_model.register_forward_pre_hook(
        lambda module, args: names.append(threading.current_thread().name)
    )
    try:
        evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, batch_size=1, streams=2)
        assert sum(name.startswith("mcq") for name in names) == len(QUESTIONS) - 1
        names.clear()
        monkeypatch.setattr(mcq, "STREAM_MAX_ROW_TOKENS", 8)  # every prompt is longer
        evaluate_mcq(small_model, byte_tokenizer, QUESTIONS, batch_size=1, streams=2)
        assert len(names) == len(QUESTIONS) and not any(name.startswith("mcq") for name in names)
        names.clear()
        monkeypatch.setattr(mcq, "STREAM_MAX_ROW_TOKENS", 10_000)
        questions = [q for q in QUESTIONS if q.subject != "high_school_chemistry"]
        pool = [
            MCQuestion(f"dev {i}?", ["a", "b", "c", "d"], i, q.subject) for i, q in enumerate(QUESTIONS[:4])
        ]
        shared = evaluate_mcq(
            small_model, byte_tokenizer, questions, shots=2, fewshot_pool=pool, batch_size=1, streams=2
        )
        assert shared.settings["shared_prefix_groups"] == 2
        assert len(names) == len(questions) + 2 and not any(name.startswith("mcq") for name in names)
    finally:
        handle.remove()
