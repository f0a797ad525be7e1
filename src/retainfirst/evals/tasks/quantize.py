"""``quantize``: round-to-nearest weight quantization (:mod:`retainfirst.evals.attacks.quantize`) as a
diagnostic.

For each bit width, a deep copy of the model gets every Linear weight fake-quantized (symmetric, per
output channel, groups of ``eval.quantize_group_size`` input columns), then the run's forget and
utility tasks are scored again. Results per width ``b``: ``quant<b>/<result>``, ``quant<b>_forget``
(forget score after quantization, of the unlearned model and before unlearning), ``quant<b>``
(recovered fraction) and ``quant<b>_utility`` (utility numbers after quantization, % of the
unlearned model's). Nothing runs on the model before unlearning (the "before" row stays empty).

Options (``eval`` section): ``quantize_bits`` ([8, 4]), ``quantize_group_size`` (128; -1 = whole
row), ``quantize_embeddings`` (false: embeddings and a tied output head stay in full precision),
``quantize_tasks`` (default: every forget and utility task of ``eval.tasks``).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.evals.attacks.quantize import check_quantization, quantize_model
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.attack import (
    AttackData,
    AttackTask,
    attack_headlines,
    evaluate_tasks,
)
from retainfirst.evals.tasks.base import Headline, TaskContext

DEFAULT_BITS = (8, 4)  # eval.quantize_bits' default: the widths whose headlines are listed
RESULT_NAME = re.compile(r"quant(\d+)(?:_forget|_utility)?")


def headlines_for_bits(bits: int) -> list[Headline]:
    return attack_headlines(f"quant{bits}", f"{bits}-bit", with_utility=True)


@register_task("quantize")
class QuantizeTask(AttackTask):
    headline = "recovered"
    label = "quant rec."
    description = "share of the forgotten forget score that rounding the weights to a few bits brings back"
    tasks_option = "quantize_tasks"
    target_roles = ("forget", "utility")

    def headlines(self) -> list[Headline]:
        return [h for bits in DEFAULT_BITS for h in headlines_for_bits(bits)]

    def headline_for(self, result: EvalResult) -> Headline | None:
        match = RESULT_NAME.fullmatch(result.task)
        if match is None:
            return None
        return {h.key: h for h in headlines_for_bits(int(match.group(1)))}.get(result.task)

    def options(self, settings: Any) -> dict[str, Any]:
        """The ``eval.quantize_*`` settings (the config checks each width; here, the list and group size)."""
        bits, group_size = list(settings.quantize_bits), settings.quantize_group_size
        if not bits or len(set(bits)) != len(bits):
            raise RetainFirstError(
                "config: eval.quantize_bits must be a non-empty list of distinct bit widths"
            )
        for b in bits:
            try:
                check_quantization(b, group_size)
            except RetainFirstError as exc:
                raise RetainFirstError(f"config: eval.quantize_*: {exc}") from None
        return {"bits": bits, "group_size": group_size, "include_embeddings": settings.quantize_embeddings}

    def prepare(self, context: TaskContext) -> AttackData:
        data = self.prepare_inner(context)
        self.measure_reference(context, data)
        return data

    def describe(self, data: AttackData) -> str:
        widths = "/".join(str(b) for b in data.options["bits"])
        return f"{widths}-bit weights, then {', '.join(t.id for t in data.tasks)}"

    def run(self, model: Any, tokenizer: Any, data: AttackData, settings: Any) -> list[EvalResult]:
        if data.is_original(model):
            return []  # the model before unlearning: its scores were measured in prepare
        opts = data.options
        unlearned = evaluate_tasks(model, tokenizer, data.tasks, data.data, settings)
        results: list[EvalResult] = []
        for bits in opts["bits"]:
            quantized = copy.deepcopy(model)
            try:
                counts = quantize_model(
                    quantized, bits, opts["group_size"], include_embeddings=opts["include_embeddings"]
                )
                attacked = evaluate_tasks(quantized, tokenizer, data.tasks, data.data, settings)
            finally:
                del quantized
            record = {**opts, **counts}
            results += self.attack_results(
                f"quant{bits}", data, unlearned, attacked, record, with_utility=True
            )
        return results
