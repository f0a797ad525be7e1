"""Registry, options and input validation: bad input raises RetainFirstError naming the problem."""

from __future__ import annotations

import math

import pytest
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.synthesis import (
    SYNTHESIZERS,
    Synthesizer,
    SynthesizerOptions,
    available_synthesizers,
    get_synthesizer,
    register_synthesizer,
)
from retainfirst.validation import PositiveFloat

BUILT_INS = {"sum", "retain_only", "pcgrad", "pcgrad_global", "blur", "sago", "sago_prefer_retain"}


def test_built_ins_are_registered():
    assert set(available_synthesizers()) >= BUILT_INS
    assert available_synthesizers() == sorted(available_synthesizers())
    for name in BUILT_INS:
        syn = get_synthesizer(name, alpha=0.5, gamma=2.0)
        assert syn.name == name and syn.alpha == 0.5 and syn.gamma == 2.0
        assert name in repr(syn)


def test_names_are_case_and_dash_insensitive():
    assert get_synthesizer(" SAGO-prefer-retain ").name == "sago_prefer_retain"


def test_unknown_name_lists_valid_choices():
    with pytest.raises(RetainFirstError, match=r"unknown synthesizer 'sagoo'.*pcgrad_global.*sago"):
        get_synthesizer("sagoo")
    with pytest.raises(RetainFirstError, match="must be a string"):
        get_synthesizer(3)


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, "1.0", True, None])
@pytest.mark.parametrize("weight", ["alpha", "gamma"])
def test_bad_weights_are_rejected(weight, value):
    with pytest.raises(RetainFirstError, match=weight):
        get_synthesizer("sum", **{weight: value})


def test_zero_weights_and_numpy_like_reals_are_accepted():
    syn = get_synthesizer("pcgrad", alpha=0, gamma=torch.tensor(2.0).item())
    assert syn.alpha == 0.0 and syn.gamma == 2.0


def test_options_are_checked():
    assert get_synthesizer("pcgrad", eps=0.0).settings == {"eps": 0.0}
    assert get_synthesizer("sago", keep_retain_where_forget_zero=True).settings[
        "keep_retain_where_forget_zero"
    ]
    with pytest.raises(
        RetainFirstError,
        match=r"^synthesizer 'sago': unknown option 'eps'; valid options: keep_retain_where_forget_zero$",
    ):
        get_synthesizer("sago", eps=1e-8)
    with pytest.raises(
        RetainFirstError, match="synthesizer 'sum': unknown option 'eps'; valid options: none"
    ):
        get_synthesizer("sum", eps=1e-8)
    with pytest.raises(
        RetainFirstError, match="keep_retain_where_forget_zero='yes' is invalid; expected true or"
    ):
        get_synthesizer("sago", keep_retain_where_forget_zero="yes")
    with pytest.raises(RetainFirstError, match=r"synthesizer 'blur': eps=-1\.0 must be >= 0"):
        get_synthesizer("blur", eps=-1.0)
    with pytest.raises(RetainFirstError, match="eps=nan must be a finite number"):
        get_synthesizer("pcgrad", eps=math.nan)


def _grads():
    return [torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)]


@pytest.mark.parametrize(
    ("forget", "retain", "message"),
    [
        ([torch.randn(3)], [torch.randn(3), None], "forget_grads has 1 entries but retain_grads has 2"),
        ([torch.randn(3)], [torch.randn(4)], r"gradient 0: forget shape \(3,\) != retain shape \(4,\)"),
        (
            [torch.randn(3), [1.0]],
            [torch.randn(3), None],
            r"forget_grads\[1\] must be a tensor or None, got list",
        ),
        ([None], [3.0], r"retain_grads\[0\] must be a tensor or None, got float"),
        ([torch.ones(3, dtype=torch.long)], [None], "floating-point"),
        ([torch.randn(3)], [torch.randn(3).double()], "dtype"),
        (torch.randn(3), [torch.randn(3)], "forget_grads must be a list"),
    ],
)
def test_bad_gradient_lists_are_rejected(forget, retain, message):
    with pytest.raises(RetainFirstError, match=message):
        get_synthesizer("sago").combine(forget, retain)


def test_validation_happens_before_anything_is_modified():
    good_forget, good_retain = torch.randn(4), torch.randn(4)
    before = good_retain.clone()
    with pytest.raises(RetainFirstError, match="gradient 1"):
        get_synthesizer("sum").combine([good_forget, torch.randn(2)], [good_retain, torch.randn(3)])
    assert torch.equal(good_retain, before)


def test_all_none_and_empty_lists():
    update, stats = get_synthesizer("pcgrad").combine([None, None], [None, None])
    assert update == [None, None]
    assert stats["conflict_fraction"] == 0.0 and stats["norm_update"] == 0.0
    assert get_synthesizer("sago").combine([], [])[0] == []


def test_bad_all_reduce_result_is_reported():
    forget, retain = _grads()
    with pytest.raises(RetainFirstError, match="all_reduce_fn must return a tensor with as many elements"):
        get_synthesizer("sum").combine(forget, retain, all_reduce_fn=lambda t: t[:1])


def test_register_a_custom_strategy():
    @register_synthesizer("test_half_sum")
    class HalfSum(Synthesizer):
        """u = scale * (gamma*g_f + alpha*g_r)."""

        class Options(SynthesizerOptions):
            scale: PositiveFloat = 0.5

        def update_chunk(self, forget, retain, conflict, coefficient):
            return (forget * self.gamma + retain * self.alpha) * self.options.scale, ()

    try:
        assert "test_half_sum" in available_synthesizers()
        update, stats = get_synthesizer("test_half_sum").combine([torch.ones(3)], [torch.ones(3)])
        assert torch.equal(update[0], torch.ones(3)) and stats["norm_update"] == pytest.approx(math.sqrt(3))
        with pytest.raises(RetainFirstError, match="already registered"):
            register_synthesizer("test_half_sum")(type("Other", (HalfSum,), {}))
        with pytest.raises(RetainFirstError, match="Synthesizer subclass"):
            register_synthesizer("test_not_a_class")(object)
        assert get_synthesizer("test_half_sum", scale=1.0).settings == {"scale": 1.0}
        with pytest.raises(RetainFirstError, match="synthesizer 'test_half_sum': scale=0 must be > 0"):
            get_synthesizer("test_half_sum", scale=0)
    finally:
        SYNTHESIZERS.unregister("test_half_sum")
