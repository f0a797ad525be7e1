"""The ``quantize`` attack task: metadata, config checks, and the textbook failure it detects:
unlearning that moved the weights by less than half a 4-bit step is undone by 4-bit rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from retainfirst.config import EvalConfig
from retainfirst.errors import RetainFirstError
from retainfirst.evals.attacks.quantize import fake_quantize, quantize_groups, quantize_model
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import EvalTask, check_tasks, get_task, register_task, unregister_task
from retainfirst.evals.tasks.quantize import DEFAULT_BITS

GROUP = 16


def linear_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def distance_score(model, original):
    moved = sum(float((w.detach() - original[n]).pow(2).sum()) for n, w in linear_weights(model).items())
    return 1.0 / (1.0 + moved)


class DistanceForget(EvalTask):
    """Forget score = closeness to the weights the task was prepared with (1 = unchanged)."""

    role = "forget"
    headline = "score"
    higher_is_better = False

    def prepare(self, context):
        return {n: w.detach().clone() for n, w in linear_weights(context.model).items()}

    def run(self, model, tokenizer, data, settings):
        return [EvalResult(self.name, {"score": distance_score(model, data)}, 3)]


class NormUtility(EvalTask):
    """A utility number: the mean |w| of the first attention projection."""

    role = "utility"
    headline = "norm"
    higher_is_better = True

    def prepare(self, context):
        return None

    def run(self, model, tokenizer, data, settings):
        weight = model.model.layers[0].self_attn.q_proj.weight.detach()
        return [EvalResult(self.name, {"norm": float(weight.abs().mean())}, 5)]


@pytest.fixture
def quantize():
    """The built-in task, with the test tasks registered only while a test runs (the registry tests
    list the built-ins exactly)."""
    register_task("distance_forget")(DistanceForget)
    register_task("norm_utility")(NormUtility)
    yield get_task("quantize")
    for name in ("distance_forget", "norm_utility"):
        unregister_task(name)


@pytest.fixture
def on_grid(model):
    """The tiny model in float64 with every Linear weight already on its 4-bit grid."""
    model = model.double()
    with torch.no_grad():
        for weight in linear_weights(model).values():
            weight.copy_(fake_quantize(weight, 4, GROUP))
    return model


def nudged(model):
    """A copy moved by a tenth of a 4-bit step, except at each group's largest |w| (scales unchanged)."""
    copied = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in linear_weights(copied).values():
            codes, scales = quantize_groups(weight, 4, GROUP)
            step = scales.repeat_interleave(GROUP, dim=1)[:, : weight.shape[1]]
            noise = torch.rand(weight.shape, generator=generator, dtype=weight.dtype) * 2 - 1
            weight.add_(torch.where(codes.abs() == 7, 0.0, 0.1 * step * noise))
    return copied


def test_metadata(quantize):
    keys = [h.key for h in quantize.headlines()]
    assert keys == ["quant8", "quant8_forget", "quant8_utility", "quant4", "quant4_forget", "quant4_utility"]
    assert {h.role for h in quantize.headlines()} == {"diagnostic"}
    assert quantize.headline_for(EvalResult("quant3_utility", {}, 1)).metric == "utility"
    assert quantize.headline_for(EvalResult("quant4/forget_qa", {}, 1)) is None
    assert quantize.headline_for(EvalResult("quant4_other", {}, 1)) is None


def test_config_checks(quantize, make_context):
    # The config runs check_tasks when it is built, so a bad setting never makes a config.
    with pytest.raises(RetainFirstError, match="re-runs the forget/utility tasks"):
        make_context(tasks=["quantize"])
    for options, message in [
        ({"quantize_bits": [4, 1]}, r"^config: eval\.quantize_bits\[1\]=1 must be an integer in \[2, 8\]$"),
        ({"quantize_bits": [4, 9]}, r"^config: eval\.quantize_bits\[1\]=9 must be an integer in \[2, 8\]$"),
        ({"quantize_bits": []}, "non-empty list"),
        ({"quantize_bits": [4, 4]}, "non-empty list of distinct bit widths"),
        ({"quantize_group_size": 0}, "group size must be >= 1 or -1"),
        ({"quantize_group_size": -2}, r"^config: eval\.quantize_group_size=-2 must be an integer >= -1$"),
        (
            {"quantize_embeddings": "yes"},
            r"^config: eval\.quantize_embeddings='yes' is invalid; expected true or false$",
        ),
        ({"quantize_tasks": ["mia"]}, "lists 'mia', which has no forget/utility number"),
    ]:
        with pytest.raises(RetainFirstError, match=message):
            make_context(tasks=["facts", "quantize"], **options)
    context = make_context(tasks=["facts", "quantize"], quantize_tasks=["mmlu"])
    check_tasks(context.config)
    assert [t.id for t in quantize.inner_tasks(context.config)] == ["mmlu"]


def test_the_listed_headlines_are_those_of_the_default_bit_widths():
    assert list(DEFAULT_BITS) == EvalConfig().quantize_bits


def test_four_bit_rounding_undoes_a_sub_step_unlearning_exactly(
    quantize, make_context, on_grid, byte_tokenizer
):
    context = make_context(
        tasks=["distance_forget", "norm_utility", "quantize"], training=True, quantize_group_size=GROUP
    )
    context.model = on_grid
    data = quantize.prepare(context)
    assert data.reference_score == 1.0
    assert quantize.run(on_grid, byte_tokenizer, data, context.config.eval) == []  # the "before" row
    unlearned = nudged(on_grid)
    results = {r.task: r for r in quantize.run(unlearned, byte_tokenizer, data, context.config.eval)}

    original = DistanceForget().prepare(context)
    now = distance_score(unlearned, original)
    assert now < 1.0
    assert results["quant4_forget"].metrics == {"after": 1.0, "unlearned": now, "before": 1.0}
    assert results["quant4"].metrics == {"recovered": 1.0}  # the knowledge was only hidden
    eight = copy.deepcopy(unlearned)
    counts = quantize_model(eight, 8, GROUP)
    after8 = distance_score(eight, original)
    assert results["quant8_forget"].metrics == {"after": after8, "unlearned": now, "before": 1.0}
    assert results["quant8"].metrics == {"recovered": (after8 - now) / (1.0 - now)}
    assert results["quant8"].metrics["recovered"] < 0.5  # 8-bit steps are finer than the nudge
    assert results["quant8"].settings == {"bits": 8, "group_size": GROUP, "include_embeddings": False} | {
        k: counts[k] for k in ("tensors", "parameters")
    }

    norm = NormUtility().run
    before_norm = norm(unlearned, None, None, None)[0].metrics["norm"]
    after_norm = norm(eight, None, None, None)[0].metrics["norm"]
    assert results["quant8_utility"].metrics == {
        "utility": 100.0 * after_norm / before_norm,
        "kept/norm_utility": 100.0 * after_norm / before_norm,
    }
    assert results["quant8/norm_utility"].metrics == {"norm": after_norm}
    assert list(results)[:2] == ["quant8/distance_forget", "quant8/norm_utility"]


def test_runs_the_facts_and_mmlu_tasks_on_a_quantized_copy(quantize, make_context, model, byte_tokenizer):
    context = make_context(tasks=["facts", "perplexity", "quantize"], probe_limit=1, quantize_bits=[4])
    data = quantize.prepare(context)
    assert data.reference is None and [t.id for t in data.tasks] == ["facts", "perplexity"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = quantize.run(model, byte_tokenizer, data, context.config.eval)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model is untouched
    names = [r.task for r in results]
    probes = list(data.data["facts"]["probes"])  # forget, held-out, general and retain-fit sets
    assert len(probes) == 8
    assert names[:9] == [f"quant4/{f}" for f in probes] + ["quant4/perplexity"]
    assert names[9:] == ["quant4_forget", "quant4", "quant4_utility"]
    assert set(results[10].metrics) == set()  # no score before unlearning: no recovered fraction
    assert set(results[11].metrics) == {"utility", "kept/heldout", "kept/general_qa", "kept/ppl"}
    assert quantize.describe(data) == "4-bit weights, then facts, perplexity"
