"""Forget objectives against brute-force computations, masking, gradient directions, RMU's control vector."""

from __future__ import annotations

import math
import re

import pytest
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.models import build_tiny_llama
from retainfirst.objectives import (
    FrozenCopyReference,
    get_forget_objective,
    get_retain_objective,
    layer_output,
)


def mean_token_nll(helpers, model, batch) -> float:
    rows = helpers.sequences(model, batch)
    return -sum(total for total, _ in rows) / sum(count for _, count in rows)


def test_ga_is_minus_mean_token_nll(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    ga = get_forget_objective("ga")
    loss = ga.loss(tiny_model, batch, None)
    assert loss.dim() == 0 and loss.requires_grad
    assert loss.item() == pytest.approx(-mean_token_nll(helpers, tiny_model, batch), abs=1e-4)
    assert ga.last_metrics["nll"] == pytest.approx(-loss.item(), abs=1e-6)


def test_eos_inside_text_is_scored_but_padding_is_not(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    assert (batch["input_ids"][0, : int(batch["attention_mask"][0].sum())] == 0).any()  # eos in real text
    with_eos = mean_token_nll(helpers, tiny_model, batch)
    loss = get_forget_objective("ga").loss(tiny_model, batch, None).item()
    assert loss == pytest.approx(-with_eos, abs=1e-4)
    # Scoring by pad id (dropping every token 0) would give a different value: the check can fail.
    dropped = dict(batch, loss_mask=batch["attention_mask"] * (batch["input_ids"] != 0))
    assert get_forget_objective("ga").loss(tiny_model, dropped, None).item() != pytest.approx(loss, abs=1e-4)


@pytest.mark.parametrize(
    ("kind", "name", "kwargs"),
    [
        ("forget", "ga", {}),
        ("forget", "npo", {"beta": 0.5}),
        ("forget", "simnpo", {"beta": 1.0, "delta": 0.2}),
        ("forget", "rmu", {"layer": 2}),
        ("retain", "nll", {}),
        ("retain", "kl", {}),
        ("retain", "embed_diff", {"layer": 1}),
    ],
)
def test_padded_positions_ids_change_nothing(
    tiny_model, byte_tokenizer, helpers, perturbed_copy, kind, name, kwargs
):
    objective = (get_forget_objective if kind == "forget" else get_retain_objective)(name, **kwargs)
    objective.setup(tiny_model, seed=0)
    reference = FrozenCopyReference(perturbed_copy(tiny_model)) if objective.needs_reference else None
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS, answer_starts=[2, 1, 4])
    scrambled = dict(batch)
    padding = batch["attention_mask"] == 0
    scrambled["input_ids"] = torch.where(padding, torch.randint(1, 200, padding.shape), batch["input_ids"])
    assert not torch.equal(scrambled["input_ids"], batch["input_ids"])
    first = objective.loss(tiny_model, batch, reference)
    second = objective.loss(tiny_model, scrambled, reference)
    assert first.item() == pytest.approx(second.item(), abs=1e-5)


def test_npo_matches_brute_force_with_a_different_reference(
    tiny_model, byte_tokenizer, helpers, perturbed_copy
):
    other = perturbed_copy(tiny_model)
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS, answer_starts=[3, 2, 5])
    beta = 0.7
    npo = get_forget_objective("npo", beta=beta)
    assert npo.needs_reference
    loss = npo.loss(tiny_model, batch, FrozenCopyReference(other))
    model_rows, ref_rows = helpers.sequences(tiny_model, batch), helpers.sequences(other, batch)
    terms = [
        helpers.log_sigmoid(-beta * (m - r)) for (m, _), (r, _) in zip(model_rows, ref_rows, strict=True)
    ]
    expected = -(2 / beta) * sum(terms) / len(terms)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert abs(expected - (2 / beta) * math.log(2)) > 1e-2  # the reference really differs


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_with_itself_as_reference_is_2_over_beta_log_2(tiny_model, byte_tokenizer, helpers, beta):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    loss = get_forget_objective("npo", beta=beta).loss(tiny_model, batch, FrozenCopyReference(tiny_model))
    assert loss.item() == pytest.approx((2 / beta) * math.log(2), rel=1e-5)


def test_npo_without_reference_is_a_clear_error(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    with pytest.raises(RetainFirstError, match="needs a reference"):
        get_forget_objective("npo").loss(tiny_model, batch, None)


def test_simnpo_matches_brute_force_on_answer_tokens(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS, answer_starts=[4, 3, 6])
    beta, delta = 2.5, 0.3
    simnpo = get_forget_objective("simnpo", beta=beta, delta=delta)
    assert not simnpo.needs_reference
    loss = simnpo.loss(tiny_model, batch, None)
    rows = helpers.sequences(tiny_model, batch)
    terms = [helpers.log_sigmoid(beta * (-total / count - delta)) for total, count in rows]
    assert loss.item() == pytest.approx(-(2 / beta) * sum(terms) / len(terms), abs=1e-4)


def test_simnpo_skips_sequences_without_answer_tokens(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS, answer_starts=[4, 100, 6])
    loss = get_forget_objective("simnpo", beta=1.0).loss(tiny_model, batch, None)
    rows = [row for row in helpers.sequences(tiny_model, batch) if row[1] > 0]
    terms = [helpers.log_sigmoid(-total / count) for total, count in rows]
    assert len(rows) == 2
    assert loss.item() == pytest.approx(-2 * sum(terms) / 2, abs=1e-4)


@pytest.mark.parametrize(("name", "kwargs"), [("ga", {}), ("npo", {}), ("simnpo", {}), ("rmu", {"layer": 1})])
def test_batch_without_scored_tokens_raises(tiny_model, byte_tokenizer, helpers, name, kwargs):
    objective = get_forget_objective(name, **kwargs)
    objective.setup(tiny_model)
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    batch["loss_mask"] = torch.zeros_like(batch["attention_mask"])
    reference = FrozenCopyReference(tiny_model) if objective.needs_reference else None
    with pytest.raises(RetainFirstError, match="no scored tokens"):
        objective.loss(tiny_model, batch, reference)


def sgd_step(model, loss, lr, parameters=None):
    params = [p for p in (parameters or model.parameters()) if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for parameter, grad in zip(params, grads, strict=True):
            parameter.sub_(lr * grad)


def test_ga_step_increases_nll_and_nll_step_decreases_it(byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    for objective, sign in ((get_forget_objective("ga"), 1), (get_retain_objective("nll"), -1)):
        model = build_tiny_llama(len(byte_tokenizer), seed=0)
        before = mean_token_nll(helpers, model, batch)
        sgd_step(model, objective.loss(model, batch, None), lr=0.05)
        after = mean_token_nll(helpers, model, batch)
        assert sign * (after - before) > 1e-3, (objective.name, before, after)


def test_forget_losses_on_bf16_model_are_float32_scalars_with_graph(byte_tokenizer, helpers):
    model = build_tiny_llama(len(byte_tokenizer), seed=0, dtype=torch.bfloat16)
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    for name in ("ga", "npo", "simnpo"):
        objective = get_forget_objective(name)
        loss = objective.loss(model, batch, FrozenCopyReference(model))
        assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.requires_grad
        assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# RMU


def test_rmu_control_vector_is_seeded_normalised_and_positive(tiny_model):
    first, second, third = (get_forget_objective("rmu", layer=2, steering_coeff=6.5) for _ in range(3))
    first.setup(tiny_model, seed=3)
    second.setup(tiny_model, seed=3)
    third.setup(tiny_model, seed=4)
    assert torch.equal(first.control_vector, second.control_vector)
    assert not torch.equal(first.control_vector, third.control_vector)
    assert first.control_vector.shape == (tiny_model.config.hidden_size,)
    assert first.control_vector.norm().item() == pytest.approx(6.5, rel=1e-6)
    assert (first.control_vector >= 0).all()
    fixed = get_forget_objective("rmu", layer=2, seed=3)
    fixed.setup(tiny_model, seed=99)  # the option wins over the engine's seed
    assert torch.equal(fixed.control_vector, first.control_vector)


def test_rmu_state_dict_round_trip(tiny_model):
    source = get_forget_objective("rmu", layer=2)
    source.setup(tiny_model, seed=5)
    restored = get_forget_objective("rmu", layer=2)
    restored.load_state_dict(source.state_dict())
    assert torch.equal(restored.control_vector, source.control_vector)
    with pytest.raises(RetainFirstError, match="layer"):
        get_forget_objective("rmu", layer=1).load_state_dict(source.state_dict())


def test_rmu_trainable_patterns_match_exactly_three_down_projections(tiny_model):
    rmu = get_forget_objective("rmu", layer=3)
    rmu.setup(tiny_model)
    names = [name for name, _ in tiny_model.named_parameters()]
    matched = [n for n in names if any(re.fullmatch(p, n) for p in rmu.trainable_patterns)]
    searched = [n for n in names if any(re.search(p, n) for p in rmu.trainable_patterns)]
    expected = [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)]
    assert matched == expected and searched == expected
    assert rmu.retain_layer == 3
    custom = get_forget_objective("rmu", layer=3, trainable_layers=[0])
    assert [n for n in names if any(re.fullmatch(p, n) for p in custom.trainable_patterns)] == [
        "model.layers.0.mlp.down_proj.weight"
    ]


def test_rmu_layer_is_validated_against_the_model(tiny_model):
    with pytest.raises(RetainFirstError, match=r"layer 7 does not exist.*0\.\.3"):
        get_forget_objective("rmu").setup(tiny_model)  # default layer 7, tiny model has 4


def test_rmu_needs_setup_before_loss(tiny_model, byte_tokenizer, helpers):
    with pytest.raises(RetainFirstError, match="setup"):
        get_forget_objective("rmu", layer=1).loss(tiny_model, helpers.batch(byte_tokenizer, helpers.TEXTS))


def test_rmu_loss_matches_brute_force_mse_to_control_vector(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS, answer_starts=[0, 2, 3])
    rmu = get_forget_objective("rmu", layer=2)
    rmu.setup(tiny_model, seed=0)
    loss = rmu.loss(tiny_model, batch, None)
    expected = helpers.masked_mse(helpers.hidden(tiny_model, batch, 2), rmu.control_vector, batch)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    full = get_forget_objective("rmu", layer=2, early_exit=False)
    full.load_state_dict(rmu.state_dict())
    assert full.loss(tiny_model, batch, None).item() == pytest.approx(loss.item(), rel=1e-6)


def test_rmu_loss_decreases_under_sgd_on_its_trainable_parameters(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    rmu = get_forget_objective("rmu", layer=3)
    rmu.setup(tiny_model, seed=0)
    params = [
        p for n, p in tiny_model.named_parameters() if any(re.fullmatch(q, n) for q in rmu.trainable_patterns)
    ]
    losses = []
    for _ in range(3):
        loss = rmu.loss(tiny_model, batch, None)
        losses.append(loss.item())
        sgd_step(tiny_model, loss, lr=5.0, parameters=params)
    assert losses[2] < losses[1] < losses[0]


def test_layer_output_equals_hidden_states(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    with torch.no_grad():
        states = tiny_model(**batch, output_hidden_states=True).hidden_states
    for layer in (0, 2):
        hidden = layer_output(tiny_model, batch["input_ids"], batch["attention_mask"], layer)
        assert torch.allclose(hidden, states[layer + 1], atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_layer_output_carries_gradient_under_gradient_checkpointing(byte_tokenizer, helpers, use_reentrant):
    """transformers checkpoints a layer's forward, not its hooks: the captured output must carry grads."""
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    gradients = []
    for checkpointing in (False, True):
        model = build_tiny_llama(len(byte_tokenizer), seed=0)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
            )
        # reentrant checkpointing supports .backward() only, not torch.autograd.grad
        layer_output(model, batch["input_ids"], batch["attention_mask"], 2).pow(2).sum().backward()
        gradients.append(model.model.layers[1].mlp.down_proj.weight.grad)
    assert gradients[0].abs().sum() > 0
    assert torch.allclose(gradients[1], gradients[0], atol=1e-5)
