"""Registries: names, validated options, flags and the metrics an engine logs."""

from __future__ import annotations

import pytest
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.objectives import (
    FORGET_OBJECTIVES,
    Objective,
    ObjectiveOptions,
    available_forget_objectives,
    available_retain_objectives,
    get_forget_objective,
    get_retain_objective,
    register_forget_objective,
    register_retain_objective,
)


def test_available_objectives():
    assert available_forget_objectives() == ["ga", "npo", "rmu", "simnpo"]
    assert available_retain_objectives() == ["embed_diff", "kl", "nll", "none"]


def test_flags_defaults_and_names():
    expected_reference = {"ga": False, "npo": True, "simnpo": False, "rmu": False}
    for name, needs in expected_reference.items():
        objective = get_forget_objective(name)
        assert objective.name == name and objective.kind == "forget"
        assert objective.needs_reference is needs
    for name, needs in {"nll": False, "kl": True, "embed_diff": True}.items():
        objective = get_retain_objective(name)
        assert objective.name == name and objective.kind == "retain"
        assert objective.needs_reference is needs
    assert get_forget_objective("npo").config() == {"beta": 0.1}
    assert get_forget_objective("simnpo").config() == {"beta": 2.5, "delta": 0.0}
    rmu = get_forget_objective("rmu")
    assert (rmu.layer, rmu.steering_coeff) == (7, 6.5)
    assert get_retain_objective("embed_diff").config()["coefficient"] == 1.0
    assert get_forget_objective("ga").trainable_patterns is None


def test_unknown_name_lists_the_choices():
    with pytest.raises(
        RetainFirstError, match=r"unknown forget objective 'gd'; valid choices: ga, npo, rmu, simnpo$"
    ):
        get_forget_objective("gd")
    with pytest.raises(
        RetainFirstError, match=r"unknown retain objective 'ga'; valid choices: embed_diff, kl, nll"
    ):
        get_retain_objective("ga")


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(
        RetainFirstError,
        match=r"^forget objective 'simnpo': unknown option 'gamma'; valid options: beta, delta$",
    ):
        get_forget_objective("simnpo", gamma=0.1)
    with pytest.raises(
        RetainFirstError, match="retain objective 'nll': unknown option 'beta'; valid options: none"
    ):
        get_retain_objective("nll", beta=1.0)


@pytest.mark.parametrize(
    ("kind", "name", "kwargs", "message"),
    [
        ("forget", "npo", {"beta": 0}, "forget objective 'npo': beta=0 must be > 0"),
        ("forget", "npo", {"beta": True}, "beta=True is invalid; expected a number"),
        ("forget", "simnpo", {"delta": "0.1"}, "delta='0.1' is invalid; expected a number"),
        ("forget", "rmu", {"layer": -1}, "layer=-1 must be an integer >= 0"),
        ("forget", "rmu", {"layer": 2.5}, "layer=2.5 is invalid; expected an integer"),
        ("forget", "rmu", {"steering_coeff": -6.5}, "steering_coeff=-6.5 must be > 0"),
        ("forget", "rmu", {"trainable_layers": []}, r"trainable_layers=\[\] must not be empty"),
        ("forget", "rmu", {"trainable_layers": [1, -1]}, r"trainable_layers\[1\]=-1 must be an integer >= 0"),
        ("forget", "rmu", {"early_exit": "yes"}, "early_exit='yes' is invalid; expected true or false"),
        ("retain", "embed_diff", {"coefficient": -1}, "coefficient=-1 must be >= 0"),
    ],
)
def test_bad_values_are_clear_errors(kind, name, kwargs, message):
    factory = get_forget_objective if kind == "forget" else get_retain_objective
    with pytest.raises(RetainFirstError, match=message):
        factory(name, **kwargs)


def test_register_a_new_objective_and_refuse_a_clash():
    @register_forget_objective("test_constant")
    class Constant(Objective):
        class Options(ObjectiveOptions):
            value: float = 1.0

        def compute(self, model, batch, reference):
            return torch.tensor(self.value)

    try:
        assert get_forget_objective("test_constant", value=2.0).value == 2.0
        assert get_forget_objective("test_constant").config() == {"value": 1.0}
        with pytest.raises(RetainFirstError, match="unknown option 'valu'; valid options: value"):
            get_forget_objective("test_constant", valu=2.0)
        with pytest.raises(RetainFirstError, match="already registered"):
            register_forget_objective("ga")(Constant)
        with pytest.raises(RetainFirstError, match=r"Constant.kind is 'forget'"):
            register_retain_objective("test_constant")(Constant)
    finally:
        FORGET_OBJECTIVES.unregister("test_constant")


def test_stateless_objectives_have_empty_state():
    ga = get_forget_objective("ga")
    assert ga.state_dict() == {}
    ga.load_state_dict({})
    with pytest.raises(RetainFirstError, match="no state"):
        ga.load_state_dict({"x": 1})
