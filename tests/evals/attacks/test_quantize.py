"""Round-to-nearest fake quantization: values on the grid, error bounds, groups, which weights."""

from __future__ import annotations

import pytest
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.evals.attacks.quantize import fake_quantize, quantize_groups, quantize_model
from retainfirst.models import build_tiny_llama


def weight(rows: int = 6, cols: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def group_slices(cols: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, cols)) for start in range(0, cols, size)]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size", [-1, 8, 5, 20, 64])
def test_values_lie_on_each_groups_grid_within_half_a_step(bits, group_size):
    w = weight()
    codes, scales = quantize_groups(w, bits, group_size)
    top = 2 ** (bits - 1) - 1
    size = 20 if group_size in (-1, 64) else group_size
    slices = group_slices(20, size)
    assert scales.shape == (6, len(slices))
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= top
    deq = fake_quantize(w, bits, group_size)
    assert deq.dtype == w.dtype
    for g, cols in enumerate(slices):
        scale = scales[:, g : g + 1]
        # the scale is the group's own largest |w| over the top code, and that value is exact
        assert torch.equal(scale, w[:, cols].abs().amax(dim=1, keepdim=True) / top)
        assert torch.allclose(deq[:, cols] / scale, codes[:, cols], rtol=0, atol=1e-9)
        assert torch.all((w[:, cols] - deq[:, cols]).abs() <= scale / 2 + 1e-12)
        assert torch.allclose(deq[:, cols].abs().amax(dim=1), w[:, cols].abs().amax(dim=1), atol=1e-12)


def test_a_shorter_last_group_gets_its_own_scale():
    w = torch.zeros(1, 10, dtype=torch.float64)
    w[0, :8] = 100.0  # the first group of 8 is large ...
    w[0, 8:] = torch.tensor([0.3, -0.7])  # ... the 2-column tail must not borrow its scale
    _, scales = quantize_groups(w, 4, group_size=8)
    assert scales.shape == (1, 2)
    assert scales[0, 1].item() == pytest.approx(0.7 / 7)
    assert torch.allclose(fake_quantize(w, 4, 8)[0, 8:], torch.tensor([0.3, -0.7], dtype=torch.float64))
    whole_row = fake_quantize(w, 4, -1)
    assert torch.equal(whole_row[0, 8:], torch.zeros(2, dtype=torch.float64))  # 0.7 < half a step of 100/7


def test_eight_bit_error_is_smaller_than_four_bit_and_zero_rows_stay_zero():
    w = weight(32, 256, seed=1)
    w[3] = 0.0
    errors = {bits: (fake_quantize(w, bits, 128) - w).abs().mean().item() for bits in (8, 4)}
    assert 0 < errors[8] < errors[4] / 8
    assert torch.equal(fake_quantize(w, 4, 128)[3], torch.zeros(256, dtype=torch.float64))
    assert torch.equal(fake_quantize(fake_quantize(w, 4, 16), 4, 16), fake_quantize(w, 4, 16))


def test_low_precision_weights_are_rounded_in_float32_and_returned_in_their_dtype():
    w = weight().to(torch.bfloat16)
    deq = fake_quantize(w, 8, 4)
    assert deq.dtype == torch.bfloat16
    assert (deq.float() - w.float()).abs().max() <= w.float().abs().max() / 127


@pytest.mark.parametrize(("bits", "group"), [(1, 8), (9, 8), (4, 0), (4, -2), (True, 8)])
def test_bad_settings_are_one_line_errors(bits, group):
    with pytest.raises(RetainFirstError, match="quantization"):
        fake_quantize(weight(), bits, group)


@pytest.mark.parametrize("tied", [False, True])
def test_quantize_model_rounds_linear_weights_only_unless_embeddings_are_included(tied):
    model = build_tiny_llama(64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)
    if tied:  # like SmolLM2: the output head is the embedding matrix
        model.lm_head.weight = model.model.embed_tokens.weight
    original = {k: v.clone() for k, v in model.state_dict().items()}
    counts = quantize_model(model, 4, group_size=16)
    state = model.state_dict()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = [n for n in linear if not (tied and n == "lm_head")]
    assert counts == {
        "bits": 4,
        "group_size": 16,
        "tensors": len(quantized),
        "parameters": sum(state[f"{n}.weight"].numel() for n in quantized),
    }
    for name, value in state.items():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith("weight"):
            assert torch.equal(value, fake_quantize(original[name], 4, 16)), name
            assert not torch.equal(value, original[name])
        elif not (tied and module == "lm_head"):
            assert torch.equal(value, original[name]), name  # embeddings, norms
    with_embeddings = quantize_model(model, 4, group_size=16, include_embeddings=True)
    assert with_embeddings["tensors"] == len(quantized) + 1  # a tied matrix is rounded once
    embedding = model.get_input_embeddings().weight
    assert torch.equal(embedding, fake_quantize(original["model.embed_tokens.weight"], 4, 16))
