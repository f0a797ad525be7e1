"""The torchjd-backed synthesizers against torchjd's own aggregators on a stacked two-row Jacobian.

The synthesizers never see a Jacobian: they get the 2x2 Gramian from the core's reduced sums
(float32 per-tensor partial sums). So the reference here is torchjd's aggregator on the full
J = [gamma*g_f; alpha*g_r] of a small float64 model, and the tolerance is what float32 partial
sums allow: weights agree to ~1e-7 relative, so updates must agree to 1e-6 of max|J| (the measured
gap is ~1e-8).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from torch import Tensor

from retainfirst.errors import RetainFirstError
from retainfirst.models import build_tiny_llama
from retainfirst.synthesis import available_synthesizers, get_synthesizer

NAMES = ["upgrad", "dualproj", "mgda", "cagrad", "aligned_mtl", "imtl_g", "nash_mtl"]
SRC = str(Path(__file__).resolve().parents[2] / "src")

needs_torchjd = pytest.mark.skipif(
    any(
        find_spec(name) is None for name in ("torchjd", "quadprog", "qpsolvers", "cvxpy", "clarabel", "ecos")
    ),
    reason="needs the torchjd extra: pip install 'retainfirst[torchjd]'",
)


def torchjd_aggregator(name: str, **options):
    """torchjd's own aggregator for ``name`` with the synthesizer's default options."""
    from torchjd import aggregation
    from torchjd.linalg import QuadprogProjector

    pref = options.get("pref_vector")
    pref = None if pref is None else torch.tensor(pref, dtype=torch.float64)
    if name == "upgrad":
        return aggregation.UPGrad(pref, projector=QuadprogProjector())
    if name == "dualproj":
        return aggregation.DualProj(pref, projector=QuadprogProjector())
    if name == "mgda":
        return aggregation.MGDA()
    if name == "cagrad":
        return aggregation.CAGrad(c=options.get("c", 0.5))
    if name == "aligned_mtl":
        return aggregation.AlignedMTL(pref, scale_mode=options.get("scale_mode", "min"))
    if name == "imtl_g":
        return aggregation.IMTLG()
    if name == "nash_mtl":
        return aggregation.NashMTL(n_tasks=2)
    raise AssertionError(name)


@functools.cache
def model_gradients(forget_sign: float) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """(g_f, g_r) of a tiny float64 Llama: forget loss = forget_sign * CE(batch A), retain = CE(batch B).

    forget_sign = -1 is gradient ascent on the forget batch (the unlearning case: g_f and g_r
    conflict); +1 gives two aligned gradients. Cached: callers pass clones to ``combine``.
    """
    model = build_tiny_llama(
        64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0, dtype=torch.float64
    )
    generator = torch.Generator().manual_seed(1)
    forget_ids = torch.randint(1, 64, (2, 12), generator=generator)
    # the retain batch shares a sequence with the forget batch, so the two gradients correlate
    retain_ids = torch.cat([forget_ids[:1], torch.randint(1, 64, (1, 12), generator=generator)])
    params = [p for p in model.parameters() if p.requires_grad]
    forget_loss = forget_sign * model(input_ids=forget_ids, labels=forget_ids).loss
    forget = tuple(g.detach() for g in torch.autograd.grad(forget_loss, params))
    retain_loss = model(input_ids=retain_ids, labels=retain_ids).loss
    retain = tuple(g.detach() for g in torch.autograd.grad(retain_loss, params))
    return forget, retain


@pytest.fixture(scope="module", params=["conflicting", "aligned"])
def gradients(request):
    forget, retain = model_gradients(-1.0 if request.param == "conflicting" else 1.0)
    cos = float(torch.cosine_similarity(flat(forget), flat(retain), dim=0))
    assert (cos < -0.05) if request.param == "conflicting" else (cos > 0.05), cos
    return forget, retain


def flat(grads) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def cloned(grads):
    return [g.clone() for g in grads]


def assert_matches(update: Tensor, reference: Tensor, jacobian: Tensor) -> None:
    scale = float(jacobian.abs().max())
    torch.testing.assert_close(update, reference, rtol=1e-6, atol=1e-6 * scale)


@needs_torchjd
@pytest.mark.parametrize(("alpha", "gamma"), [(1.0, 1.0), (0.7, 1.6)])
@pytest.mark.parametrize("name", NAMES)
def test_matches_torchjd_on_the_stacked_jacobian(name, alpha, gamma, gradients):
    forget, retain = gradients
    jacobian = torch.stack([gamma * flat(forget), alpha * flat(retain)])
    reference = torchjd_aggregator(name)(jacobian)
    update, stats = get_synthesizer(name, alpha=alpha, gamma=gamma).combine(cloned(forget), cloned(retain))
    assert_matches(flat(update), reference, jacobian)
    assert reference.abs().max() > 0
    # the reported coefficients reproduce the update on the unscaled gradients
    rebuilt = stats["weight_forget"] * flat(forget) + stats["weight_retain"] * flat(retain)
    assert_matches(rebuilt, reference, jacobian)
    for key in (
        "conflict_fraction",
        "cos_forget_retain",
        "cos_update_retain",
        "cos_update_forget",
        "norm_update",
    ):
        assert key in stats
    assert stats["norm_update"] == pytest.approx(float(reference.norm()), rel=1e-6)


@needs_torchjd
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("upgrad", {"pref_vector": [0.2, 0.8]}),
        ("dualproj", {"pref_vector": [0.9, 0.1]}),
        ("cagrad", {"c": 0.25}),
        ("aligned_mtl", {"pref_vector": [0.3, 0.7], "scale_mode": "median"}),
    ],
)
def test_options_reach_torchjd(name, options, gradients):
    forget, retain = gradients
    jacobian = torch.stack([flat(forget), flat(retain)])
    reference = torchjd_aggregator(name, **options)(jacobian)
    default = torchjd_aggregator(name)(jacobian)
    update, _ = get_synthesizer(name, **options).combine(cloned(forget), cloned(retain))
    assert_matches(flat(update), reference, jacobian)
    assert not torch.allclose(reference, default)  # the option changes the result


@needs_torchjd
def test_upgrad_and_dualproj_never_conflict_with_either_task():
    forget, retain = model_gradients(-1.0)
    # with gamma > alpha the plain mean conflicts with g_r, so DualProj's projection is active too
    for name, alpha, gamma in [("upgrad", 1.0, 1.0), ("upgrad", 0.7, 1.6), ("dualproj", 0.7, 1.6)]:
        _, stats = get_synthesizer(name, alpha=alpha, gamma=gamma).combine(cloned(forget), cloned(retain))
        assert stats["cos_forget_retain"] < 0
        # up to the quadprog projector's regularisation (reg_eps = 1e-4 on the normalised Gramian)
        assert stats["cos_update_forget"] > -1e-3 and stats["cos_update_retain"] > -1e-3, (name, stats)


@needs_torchjd
def test_nash_mtl_keeps_its_state_across_steps_like_torchjd():
    """Two steps in a row: the warm start from step 1 must carry over exactly as in torchjd."""
    first, second = model_gradients(-1.0), model_gradients(1.0)
    reference = torchjd_aggregator("nash_mtl")
    syn = get_synthesizer("nash_mtl")
    for forget, retain in (first, second, first):
        jacobian = torch.stack([flat(forget), flat(retain)])
        update, _ = syn.combine(cloned(forget), cloned(retain))
        assert_matches(flat(update), reference(jacobian), jacobian)


@needs_torchjd
@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_give_a_zero_update(name):
    update, stats = get_synthesizer(name).combine([torch.zeros(3)], [torch.zeros(3)])
    assert torch.equal(update[0], torch.zeros(3))
    assert stats["weight_forget"] == 0.0 and stats["weight_retain"] == 0.0


@needs_torchjd
@pytest.mark.parametrize("name", NAMES)
def test_one_zero_task_matches_torchjd(name):
    """g_f = 0 (e.g. an already forgotten batch) gives a singular Gramian; results stay torchjd's."""
    retain = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)
    forget = torch.zeros(7, dtype=torch.float64)
    jacobian = torch.stack([forget, retain])
    update, _ = get_synthesizer(name).combine([forget.clone()], [retain.clone()])
    assert_matches(update[0], torchjd_aggregator(name)(jacobian), jacobian)


# ---------------------------------------------------------------------------------------------
# FSDP: two simulated ranks each hold one piece of every tensor and sum their partials through the
# all_reduce hook; the weights come from the same global Gramian, so the update is the unsharded one.


def run_two_shards(name: str, forget: Sequence[Tensor], retain: Sequence[Tensor]):
    barrier = threading.Barrier(2, timeout=60)
    slots: list[Tensor | None] = [None, None]
    results: list = [None, None]
    errors: list[BaseException] = []

    def hook(rank: int):
        def all_reduce(partials: Tensor) -> Tensor:
            slots[rank] = partials.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return all_reduce

    # uneven cuts, one empty shard of the first tensor
    cuts = [0 if i == 0 else g.numel() // 3 for i, g in enumerate(forget)]
    shards = [
        [
            [
                g.reshape(-1)[:cut].clone() if rank == 0 else g.reshape(-1)[cut:].clone()
                for g, cut in zip(grads, cuts, strict=True)
            ]
            for grads in (forget, retain)
        ]
        for rank in range(2)
    ]

    def rank_main(rank: int) -> None:
        try:
            syn = get_synthesizer(name, alpha=0.8, gamma=1.2)
            results[rank] = syn.combine(*shards[rank], all_reduce_fn=hook(rank))
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    (first, stats0), (second, stats1) = results
    return [torch.cat([a, b]) for a, b in zip(first, second, strict=True)], stats0, stats1


@needs_torchjd
@pytest.mark.parametrize("name", NAMES)
def test_two_shards_equal_the_whole(name):
    forget, retain = model_gradients(-1.0)
    whole, whole_stats = get_synthesizer(name, alpha=0.8, gamma=1.2).combine(cloned(forget), cloned(retain))
    sharded, stats0, stats1 = run_two_shards(name, forget, retain)
    assert stats0 == stats1  # every rank computed the same weights
    assert stats0["weight_forget"] == pytest.approx(whole_stats["weight_forget"], rel=1e-6)
    assert stats0["weight_retain"] == pytest.approx(whole_stats["weight_retain"], rel=1e-6)
    jacobian = torch.stack([1.2 * flat(forget), 0.8 * flat(retain)])
    assert_matches(torch.cat(sharded), flat(whole), jacobian)
    assert_matches(torch.cat(sharded), torchjd_aggregator(name)(jacobian), jacobian)


# ---------------------------------------------------------------------------------------------
# Registry, options and the optional dependency.


def test_names_are_registered_and_sweepable():
    from retainfirst.config import load_config, plan_runs

    assert set(NAMES) <= set(available_synthesizers())
    if needs_torchjd.args[0]:
        pytest.skip("validating the options checks that torchjd is installed")
    cfg = load_config(
        None,
        [
            f"synthesizers=[sum,{','.join(NAMES)}]",
            "train.synthesizer_options={}",
            "synthesizer_overrides={cagrad: {synthesizer_options: {c: 0.25}}}",
        ],
    )
    runs = plan_runs(cfg)
    assert [r.family for r in runs] == ["sum", *NAMES]
    assert runs[NAMES.index("cagrad") + 1].train.synthesizer_options == {"c": 0.25}


@needs_torchjd
@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("cagrad", {"c": -1}, r"synthesizer 'cagrad': c=-1 must be >= 0"),
        (
            "aligned_mtl",
            {"scale_mode": "max"},
            r"scale_mode='max' is not valid; choose one of min, median, rmse",
        ),
        ("upgrad", {"pref_vector": [1.0]}, r"pref_vector"),
        ("mgda", {"max_iters": 0}, r"max_iters=0 must be an integer >= 1"),
        ("imtl_g", {"c": 1}, r"unknown option 'c'"),
    ],
)
def test_bad_options_are_rejected(name, options, message):
    with pytest.raises(RetainFirstError, match=message):
        get_synthesizer(name, **options)


@needs_torchjd
def test_a_missing_solver_is_named(monkeypatch):
    from retainfirst.synthesis import multitask

    monkeypatch.setattr(multitask, "find_spec", lambda name: None if name == "quadprog" else object())
    with pytest.raises(RetainFirstError) as caught:
        get_synthesizer("upgrad")
    assert str(caught.value) == (
        "synthesizer 'upgrad': needs quadprog (not installed); pip install 'retainfirst[torchjd]'"
    )
    get_synthesizer("mgda")  # needs no solver


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def test_without_torchjd_the_names_are_listed_but_building_one_says_how_to_install():
    result = run_python(
        """
        import sys
        import retainfirst.config, retainfirst.synthesis
        assert "torchjd" not in sys.modules, "torchjd imported eagerly"
        sys.modules["torchjd"] = None  # as if it were not installed: import and find_spec fail
        from retainfirst.errors import RetainFirstError
        from retainfirst.synthesis import available_synthesizers, get_synthesizer
        from retainfirst.config import load_config, plan_runs
        assert {"upgrad", "mgda", "nash_mtl"} <= set(available_synthesizers())
        for build in (
            lambda: get_synthesizer("mgda"),
            lambda: plan_runs(
                load_config(None, ["synthesizers=[sum,upgrad]", "train.synthesizer_options={}"])
            ),
        ):
            try:
                build()
            except RetainFirstError as exc:
                print(exc)
            else:
                raise AssertionError("no error")
        get_synthesizer("sum")  # the rest is unaffected
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0] == (
        "synthesizer 'mgda': needs torchjd (not installed); pip install 'retainfirst[torchjd]'"
    )
    assert "synthesizer 'upgrad': needs torchjd" in lines[1] and "retainfirst[torchjd]" in lines[1]
