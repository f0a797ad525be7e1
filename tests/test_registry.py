"""The one Registry type, and plugins found through entry points of a throwaway installed distribution."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.evals.tasks import available_tasks, get_task, register_task
from retainfirst.objectives import (
    FORGET_OBJECTIVES,
    RETAIN_OBJECTIVES,
    available_forget_objectives,
    available_retain_objectives,
    get_forget_objective,
    get_retain_objective,
)
from retainfirst.registry import TASKS, Registry
from retainfirst.synthesis import SYNTHESIZERS, available_synthesizers, get_synthesizer


def install_distribution(tmp_path, monkeypatch, entry_points: str, module: str) -> None:
    """A distribution 'my-plugin' with module my_plugin, visible to importlib.metadata and import."""
    info = tmp_path / "my_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent(module))
    monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates the import caches
    monkeypatch.delitem(sys.modules, "my_plugin", raising=False)


@pytest.fixture
def clean_registries():
    registries = (SYNTHESIZERS, FORGET_OBJECTIVES, RETAIN_OBJECTIVES, TASKS)
    before = {id(r): set(r.available()) for r in registries}
    yield
    for registry in registries:
        for name in set(registry.available()) - before[id(registry)]:
            registry.unregister(name)
        registry.refresh()
    sys.modules.pop("my_plugin", None)


def test_generic_registry():
    shapes: Registry[type] = Registry("shape")

    @shapes.register("Square")
    class Square:
        def __init__(self, side: float = 1.0) -> None:
            self.side = side

    assert shapes.available() == ["square"] and Square.name == "square"
    assert shapes.get(" SQUARE ", side=2.0).side == 2.0
    assert "square" in shapes and "circle" not in shapes
    with pytest.raises(RetainFirstError, match=r"^unknown shape 'circle'; valid choices: square$"):
        shapes.get("circle")
    with pytest.raises(RetainFirstError, match="already registered by"):
        shapes.register("square")(type("Other", (), {}))
    with pytest.raises(RetainFirstError, match="must be a non-empty string"):
        shapes.register("  ")
    shapes.unregister("square")
    assert shapes.available() == []


def test_tasks_registry():
    """Evaluation tasks live in the generic registry too (so entry points of group retainfirst.tasks work)."""
    from retainfirst.evals.tasks import EvalTask, unregister_task

    @register_task("test_echo_task")
    class Echo(EvalTask):
        role = "diagnostic"
        headline = "echo"
        higher_is_better = True

        def prepare(self, context):
            return None

        def run(self, model, tokenizer, data, settings):
            return []

    try:
        assert TASKS.lookup("test_echo_task") is Echo
        assert "test_echo_task" in available_tasks()
        assert isinstance(get_task("test_echo_task"), Echo)
        with pytest.raises(RetainFirstError, match="already registered"):
            register_task("test_echo_task")(type("Other", (Echo,), {}))
    finally:
        unregister_task("test_echo_task")
    with pytest.raises(RetainFirstError, match="'test_echo_task' is not valid; choose one of"):
        get_task("test_echo_task")


SYNTH_MODULE = """
    from retainfirst.synthesis import Synthesizer, SynthesizerOptions
    from retainfirst.validation import PositiveFloat

    class MySynth(Synthesizer):
        '''u = scale * g_r: a third-party strategy.'''

        class Options(SynthesizerOptions):
            scale: PositiveFloat = 2.0

        def update_chunk(self, forget, retain, conflict, coefficient):
            return retain * self.options.scale, ()
"""


def test_a_synthesizer_from_an_installed_distribution(tmp_path, monkeypatch, clean_registries):
    install_distribution(
        tmp_path,
        monkeypatch,
        "[retainfirst.synthesizers]\nmy_synth = my_plugin:MySynth\n",
        SYNTH_MODULE,
    )
    synth = get_synthesizer("my_synth", scale=3.0)
    assert type(synth).__module__ == "my_plugin" and synth.name == "my_synth"
    assert "my_synth" in available_synthesizers()
    update, _ = synth.combine([torch.ones(2)], [torch.full((2,), 0.5)])
    assert torch.equal(update[0], torch.full((2,), 1.5))
    with pytest.raises(RetainFirstError, match=r"synthesizer 'my_synth': scale=0 must be > 0"):
        get_synthesizer("my_synth", scale=0)
    # a config can name it like a built-in
    from retainfirst.config import load_config, plan_runs

    cfg = load_config(None, ["synthesizers=[sum,my_synth]", "train.synthesizer_options={}"])
    assert [r.family for r in plan_runs(cfg)] == ["sum", "my_synth"]


OBJECTIVE_MODULE = """
    import torch
    from retainfirst.objectives import Objective, ObjectiveOptions

    class Zero(Objective):
        kind = "forget"

        class Options(ObjectiveOptions):
            weight: float = 0.0

        def compute(self, model, batch, reference):
            return torch.tensor(self.weight)

    class Keep(Objective):
        kind = "retain"

        def compute(self, model, batch, reference):
            return torch.tensor(0.0)

    class NoKind(Objective):
        pass
"""


def test_objectives_share_one_group_and_declare_their_kind(tmp_path, monkeypatch, clean_registries):
    install_distribution(
        tmp_path,
        monkeypatch,
        """
        [retainfirst.objectives]
        my_zero = my_plugin:Zero
        my_keep = my_plugin:Keep
        my_nokind = my_plugin:NoKind
        """,
        OBJECTIVE_MODULE,
    )
    with pytest.warns(UserWarning, match="my_nokind"):
        FORGET_OBJECTIVES.refresh()
        RETAIN_OBJECTIVES.refresh()
        assert "my_zero" in available_forget_objectives()
        assert "my_keep" in available_retain_objectives()
    assert "my_keep" not in available_forget_objectives() and "my_zero" not in available_retain_objectives()
    assert get_forget_objective("my_zero", weight=1.5).weight == 1.5
    assert get_retain_objective("my_keep").kind == "retain"
    with pytest.raises(RetainFirstError, match=r"^unknown retain objective 'my_zero'"):
        get_retain_objective("my_zero")
    with pytest.raises(
        RetainFirstError,
        match=r"^forget objective plugin 'my_nokind' \(entry point 'my_plugin:NoKind' in group "
        r"retainfirst.objectives\) failed to load: .*kind to one of 'forget', 'retain', got ''$",
    ):
        get_forget_objective("my_nokind")


def test_a_broken_entry_point_is_one_line_naming_it(tmp_path, monkeypatch, clean_registries):
    install_distribution(
        tmp_path,
        monkeypatch,
        "[retainfirst.synthesizers]\nbroken = my_plugin:Missing\nmissing_module = not_a_module:X\n",
        "VALUE = 1\n",
    )
    with pytest.warns(UserWarning), pytest.raises(RetainFirstError) as info:
        get_synthesizer("broken")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "synthesizer plugin 'broken' (entry point 'my_plugin:Missing' in group retainfirst.synthesizers) "
        "failed to load: AttributeError:"
    )
    with pytest.raises(RetainFirstError, match="ModuleNotFoundError: No module named 'not_a_module'"):
        get_synthesizer("missing_module")
    # the built-ins still work, and an unknown name says which plugins failed
    assert get_synthesizer("sago").name == "sago"
    with pytest.raises(RetainFirstError, match=r"plugins that failed to load: broken, missing_module\)$"):
        get_synthesizer("nope")
    from retainfirst.config import load_config

    with pytest.raises(
        RetainFirstError,
        match=r"^config: synthesizers\[0\]='broken' cannot be loaded: synthesizer plugin 'broken'",
    ):
        load_config(None, ["synthesizers=[broken]"])
