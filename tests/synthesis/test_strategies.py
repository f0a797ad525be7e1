"""Every strategy against a brute-force float64 reference, hypothesis properties, and sharding.

The reference below is written plainly on flattened float64 copies (it concatenates everything), so
it shares no structure with the chunked, in-place implementation it checks.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from retainfirst.synthesis import base, get_synthesizer

EPS = 1e-10


def flat_pairs(
    forget: list[Tensor | None], retain: list[Tensor | None]
) -> list[tuple[Tensor, Tensor] | None]:
    """float64 flattened copies; a missing side becomes zeros; both missing -> None."""
    pairs: list[tuple[Tensor, Tensor] | None] = []
    for f, r in zip(forget, retain, strict=True):
        if f is None and r is None:
            pairs.append(None)
            continue
        like = f if f is not None else r
        f64 = (
            f.detach().double().flatten() if f is not None else torch.zeros(like.numel(), dtype=torch.float64)
        )
        r64 = (
            r.detach().double().flatten() if r is not None else torch.zeros(like.numel(), dtype=torch.float64)
        )
        pairs.append((f64, r64))
    return pairs


def reference_combine(
    name: str,
    forget: list[Tensor | None],
    retain: list[Tensor | None],
    alpha: float,
    gamma: float,
    eps: float = EPS,
    keep_retain_where_forget_zero: bool = False,
) -> tuple[list[Tensor | None], list[Tensor | None], dict[str, float]]:
    """(float64 updates, per-element error scale, stats) of strategy ``name``.

    The error scale is |a*f| + |b*r| for the coefficients a, b actually applied, i.e. the size of the
    terms that may cancel; float rounding errors are relative to it, not to the result.
    """
    pairs = flat_pairs(forget, retain)
    present = [p for p in pairs if p is not None]
    all_f = torch.cat([f for f, _ in present]) if present else torch.zeros(0, dtype=torch.float64)
    all_r = torch.cat([r for _, r in present]) if present else torch.zeros(0, dtype=torch.float64)
    global_dot = float(all_f @ all_r)
    global_rr = float(all_r @ all_r)
    global_ff = float(all_f @ all_f)

    updates: list[Tensor | None] = []
    scales: list[Tensor | None] = []
    projected = 0
    for pair in pairs:
        if pair is None:
            updates.append(None)
            scales.append(None)
            continue
        f, r = pair
        conflict = torch.sign(f) * torch.sign(r) < 0
        if name == "sum":
            a, b = gamma, alpha
        elif name == "retain_only":
            a, b = 0.0, alpha
        elif name == "pcgrad":
            d = float(f @ r)
            rr = float(r @ r)
            if d < 0:
                projected += 1
                f = f - d / (rr + eps) * r
            a, b = gamma, alpha
        elif name == "pcgrad_global":
            if global_dot < 0:
                f = f - global_dot / (global_rr + eps) * r
            a, b = gamma, alpha
        elif name == "blur":
            r = r - global_dot / (global_ff + eps) * f
            a, b = gamma, alpha
        elif name == "sago":
            take_retain = conflict | (f == 0) if keep_retain_where_forget_zero else conflict
            update = torch.where(take_retain, alpha * r, gamma * f)
            updates.append(update)
            scales.append(update.abs())
            continue
        elif name == "sago_prefer_retain":
            update = torch.where(conflict, alpha * r, gamma * f + alpha * r)
            updates.append(update)
            scales.append(gamma * f.abs() + alpha * r.abs())
            continue
        else:
            raise KeyError(name)
        updates.append(a * f + b * r)
        scales.append(abs(a) * f.abs() + abs(b) * r.abs())

    all_u = (
        torch.cat([u for u in updates if u is not None]) if present else torch.zeros(0, dtype=torch.float64)
    )
    conflicts = int((torch.sign(all_f) * torch.sign(all_r) < 0).sum())

    def cos(x: Tensor, y: Tensor) -> float:
        nx, ny = float(x.norm()), float(y.norm())
        return float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else 0.0

    stats = {
        "conflict_fraction": conflicts / all_f.numel() if all_f.numel() else 0.0,
        "cos_forget_retain": cos(all_f, all_r),
        "cos_update_retain": cos(all_u, all_r),
        "cos_update_forget": cos(all_u, all_f),
        "norm_forget": math.sqrt(global_ff),
        "norm_retain": math.sqrt(global_rr),
        "norm_update": float(all_u.norm()),
    }
    if name == "pcgrad":
        sized = [f for f, _ in present if f.numel() > 0]  # empty tensors are not counted
        stats["projected_fraction"] = projected / len(sized) if sized else 0.0
    if name == "pcgrad_global":
        stats["projected_fraction"] = float(global_dot < 0)
    if name == "sago":
        replaced = conflict_all = torch.sign(all_f) * torch.sign(all_r) < 0
        if keep_retain_where_forget_zero:
            replaced = conflict_all | ((all_f == 0) & (all_r != 0))
        stats["replaced_fraction"] = int(replaced.sum()) / all_f.numel()
    if name == "sago_prefer_retain":
        stats["replaced_fraction"] = stats["conflict_fraction"]
    return updates, scales, stats


# ---------------------------------------------------------------------------------------------
# Fixtures: mixed shapes, None entries on either side, an empty tensor, a non-contiguous one.

STRATEGIES = ["sum", "retain_only", "pcgrad", "pcgrad_global", "blur", "sago", "sago_prefer_retain"]
# (shape, forget present, retain present)
LAYOUT = [
    ((6, 5), True, True),
    ((7,), True, True),
    ((2, 3, 4), False, True),  # retain only (e.g. embedding rows seen only in the retain batch)
    ((5,), True, False),  # forget only
    ((3,), False, False),  # no gradient at all
    ((1,), True, True),
    ((0,), True, True),  # an empty shard
    ((33, 17), True, True),
]
# rtol covers the cast of the float32 update to the output dtype; atol scale covers float32 math.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def make_grads(seed: int, dtype: torch.dtype, layout=LAYOUT) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(seed)
    forget, retain = [], []
    for shape, has_f, has_r in layout:
        f = torch.randn(shape, generator=generator)
        r = torch.randn(shape, generator=generator)
        if f.numel() > 4:  # exact zeros on either side, and on both
            f.view(-1)[:2] = 0.0
            r.view(-1)[1:3] = 0.0
        forget.append(f.to(dtype) if has_f else None)
        retain.append(r.to(dtype) if has_r else None)
    return forget, retain


def cloned(grads: list) -> list:
    return [g.clone() if g is not None else None for g in grads]


def assert_matches_reference(name, forget, retain, alpha, gamma, **options):
    dtype = next(g for g in forget + retain if g is not None).dtype
    expected, scales, expected_stats = reference_combine(name, forget, retain, alpha, gamma, **options)
    update, stats = get_synthesizer(name, alpha=alpha, gamma=gamma, **options).combine(
        cloned(forget), cloned(retain)
    )
    assert len(update) == len(expected)
    tol = TOLERANCE[dtype]
    for index, (got, want, scale) in enumerate(zip(update, expected, scales, strict=True)):
        if want is None:
            assert got is None, index
            continue
        like = forget[index] if forget[index] is not None else retain[index]
        assert got.dtype == dtype and got.shape == like.shape, index
        error = (got.double().flatten() - want).abs()
        allowed = tol * want.abs() + 1e-6 * scale + 1e-30
        assert bool((error <= allowed).all()), (name, index, float((error - allowed).max()))
    assert set(expected_stats) <= set(stats)
    for key, want in expected_stats.items():
        assert isinstance(stats[key], float), key
        assert stats[key] == pytest.approx(want, rel=1e-4, abs=1e-5), key
    return update, stats


@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    ids=lambda d: str(d).removeprefix("torch."),
)
@pytest.mark.parametrize("name", STRATEGIES)
def test_matches_brute_force_reference(name, dtype):
    forget, retain = make_grads(seed=1, dtype=dtype)
    assert_matches_reference(name, forget, retain, alpha=0.7, gamma=1.3)


@pytest.mark.parametrize("name", STRATEGIES)
def test_chunk_boundaries_do_not_change_the_result(name, monkeypatch):
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 5)  # every tensor spans several chunks
    forget, retain = make_grads(seed=2, dtype=torch.float32)
    assert_matches_reference(name, forget, retain, alpha=1.0, gamma=0.5)


@pytest.mark.parametrize("name", ["pcgrad", "pcgrad_global", "blur"])
def test_projection_happens_and_matches_reference(name):
    """Force an opposed pair so the projecting branch (not just the plain sum) is exercised."""
    forget, retain = make_grads(seed=3, dtype=torch.float32)
    forget = [
        -(r.float()) + 0.3 * f if f is not None and r is not None else f
        for f, r in zip(forget, retain, strict=True)
    ]
    _, stats = assert_matches_reference(name, forget, retain, alpha=0.5, gamma=2.0)
    assert stats["cos_forget_retain"] < -0.5
    if name == "pcgrad":
        assert stats["projected_fraction"] > 0.5
    if name == "pcgrad_global":
        assert stats["projected_fraction"] == 1.0 and stats["projection_coefficient"] < 0
    if name == "blur":
        assert stats["projection_coefficient"] < 0


def test_sago_option_keeps_retain_where_forget_is_zero():
    forget, retain = make_grads(seed=4, dtype=torch.float32)
    assert_matches_reference("sago", forget, retain, alpha=0.7, gamma=1.3, keep_retain_where_forget_zero=True)
    # The retain-only entry: zeros under the published rule, alpha*g_r with the option.
    published, _ = get_synthesizer("sago", alpha=0.7).combine(cloned(forget), cloned(retain))
    fixed, _ = get_synthesizer("sago", alpha=0.7, keep_retain_where_forget_zero=True).combine(
        cloned(forget), cloned(retain)
    )
    assert torch.count_nonzero(published[2]) == 0
    torch.testing.assert_close(fixed[2], 0.7 * retain[2])


def test_non_contiguous_gradients_are_written_back():
    f = torch.randn(6, 4).t()
    r = torch.randn(6, 4).t()
    assert not r.is_contiguous()
    assert_matches_reference("sago", [f], [r], alpha=1.0, gamma=1.0)
    original = r.clone()
    update, _ = get_synthesizer("sum", alpha=0.5).combine([f], [r])
    assert update[0] is r  # written back through the staging buffer
    torch.testing.assert_close(r, f + 0.5 * original)


@pytest.mark.parametrize("name", STRATEGIES)
def test_update_reuses_retain_storage(name):
    forget, retain = make_grads(seed=5, dtype=torch.float32)
    update, _ = get_synthesizer(name).combine(forget, retain)
    for f, r, u in zip(forget, retain, update, strict=True):
        if r is not None:
            assert u is r
        elif f is not None:
            assert u is f
        else:
            assert u is None


def peak_live_bytes(fn) -> int:
    """Peak of (allocated - freed) CPU bytes while ``fn`` runs, from the torch profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    )
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(name, torch.float32) for name in STRATEGIES] + [("sago", torch.bfloat16), ("pcgrad", torch.float16)],
    ids=lambda value: str(value).removeprefix("torch."),
)
def test_extra_memory_is_a_few_chunks_not_a_gradient_copy(name, dtype, monkeypatch):
    """Guards the memory contract: no flattened copy, no cloned list, only chunk-sized temporaries.

    The gradients span ~13 chunks, so one float32 copy of even the largest tensor alone (~10 chunks)
    would break the bound of 8 float32 chunk buffers.
    """
    chunk = 4096
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", chunk)
    layout = [((200, 200), True, True), ((8000,), True, False), ((50,), True, True), ((4000,), False, True)]
    forget, retain = make_grads(seed=8, dtype=dtype, layout=layout)
    options = {"keep_retain_where_forget_zero": True} if name == "sago" else {}
    syn = get_synthesizer(name, **options)
    peak = peak_live_bytes(lambda: syn.combine(forget, retain))
    assert peak <= 8 * chunk * 4, peak


def test_reductions_accumulate_in_float32_for_half_precision():
    """2**20 bf16 ones: a bf16 accumulator would stall far below 2**20 (its spacing there is 2**13)."""
    ones = torch.ones(2**20, dtype=torch.bfloat16)
    update, stats = get_synthesizer("sum").combine([ones.clone()], [ones.clone()])
    assert stats["norm_forget"] == pytest.approx(1024.0)
    assert stats["norm_update"] == pytest.approx(2048.0)
    assert stats["cos_forget_retain"] == pytest.approx(1.0)
    assert update[0].dtype == torch.bfloat16 and bool((update[0] == 2).all())


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("name", STRATEGIES)
def test_non_finite_gradients_show_in_the_norms_without_raising(name, bad):
    """The engine stops (or skips an fp16 overflow step) by checking norm_forget / norm_retain."""
    forget, retain = make_grads(seed=9, dtype=torch.float32)
    forget[0].view(-1)[3] = bad
    retain[1].view(-1)[0] = -bad
    _, stats = get_synthesizer(name).combine(forget, retain)
    assert not math.isfinite(stats["norm_forget"]) and not math.isfinite(stats["norm_retain"])


def test_tiny_opposite_values_count_as_conflicts():
    """sign(f)*sign(r) < 0 is strict about signs: f*r would underflow to -0.0 here."""
    f = torch.tensor([1e-30, -1e-30, 0.0, 2.0])
    r = torch.tensor([-1e-30, 1e-30, -1.0, 0.0])
    _, stats = get_synthesizer("sago").combine([f], [r.clone()])
    assert stats["conflict_fraction"] == 0.5
    assert stats["replaced_fraction"] == 0.5


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis). Values are 0 or of magnitude [2**-6, 2**6] so that eps = 1e-10 is
# negligible next to ||g_r||^2 and float32 rounding stays far below the margins checked.

magnitudes = st.floats(min_value=0.015625, max_value=64.0, allow_nan=False, width=32)
values = st.one_of(st.just(0.0), magnitudes, magnitudes.map(lambda x: -x))
weights = st.floats(min_value=0.1, max_value=10.0)


@st.composite
def gradient_pairs(draw, same_signs: bool = False):
    sizes = draw(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=4))
    forget, retain = [], []
    for size in sizes:
        f = torch.tensor(draw(st.lists(values, min_size=size, max_size=size)), dtype=torch.float32)
        r = torch.tensor(draw(st.lists(values, min_size=size, max_size=size)), dtype=torch.float32)
        if same_signs:
            f = f.abs() * torch.sign(r)
        forget.append(f)
        retain.append(r)
    return forget, retain


SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@SETTINGS
@given(
    pair=gradient_pairs(),
    alpha=weights,
    gamma=weights,
    name=st.sampled_from(["pcgrad", "pcgrad_global", "sago"]),
)
def test_update_never_opposes_retain(pair, alpha, gamma, name):
    forget, retain = pair
    retain_copy = cloned(retain)
    update, stats = get_synthesizer(name, alpha=alpha, gamma=gamma).combine(cloned(forget), cloned(retain))
    u = torch.cat(update).double()
    r = torch.cat(retain_copy).double()
    assume(float(r.norm()) > 0)
    assert float(u @ r) >= -1e-6 * float(u.norm() * r.norm())
    assert stats["cos_update_retain"] >= -1e-6
    if name == "sago":
        assert bool((u * r >= 0).all())


@SETTINGS
@given(pair=gradient_pairs(same_signs=True), alpha=weights, gamma=weights)
def test_without_conflict_pcgrad_equals_sum(pair, alpha, gamma):
    forget, retain = pair
    plain, _ = get_synthesizer("sum", alpha=alpha, gamma=gamma).combine(cloned(forget), cloned(retain))
    for name in ("pcgrad", "pcgrad_global"):
        update, stats = get_synthesizer(name, alpha=alpha, gamma=gamma).combine(
            cloned(forget), cloned(retain)
        )
        assert stats["projected_fraction"] == 0.0 and stats["conflict_fraction"] == 0.0
        for u, s in zip(update, plain, strict=True):
            assert torch.equal(u, s)


@SETTINGS
@given(pair=gradient_pairs(), name=st.sampled_from(STRATEGIES))
def test_conflict_fraction_is_the_share_of_sign_disagreements(pair, name):
    forget, retain = pair
    f, r = torch.cat(forget), torch.cat(retain)
    expected = int(((f > 0) & (r < 0) | (f < 0) & (r > 0)).sum()) / f.numel()
    _, stats = get_synthesizer(name).combine(cloned(forget), cloned(retain))
    assert 0.0 <= stats["conflict_fraction"] <= 1.0
    assert stats["conflict_fraction"] == pytest.approx(expected)


@SETTINGS
@given(pair=gradient_pairs(), alpha=weights, gamma=weights, name=st.sampled_from(STRATEGIES))
def test_bfloat16_inputs_give_bfloat16_close_to_float32(pair, alpha, gamma, name):
    forget, retain = pair
    forget16 = [f.bfloat16() for f in forget]
    retain16 = [r.bfloat16() for r in retain]
    syn = get_synthesizer(name, alpha=alpha, gamma=gamma)
    low, _ = syn.combine(cloned(forget16), cloned(retain16))
    high, _ = syn.combine([f.float() for f in forget16], [r.float() for r in retain16])
    scale = max(float(torch.cat(high).abs().max()), 1e-3)
    for u16, u32 in zip(low, high, strict=True):
        assert u16.dtype == torch.bfloat16
        torch.testing.assert_close(u16.float(), u32, rtol=2.0**-7, atol=1e-4 * scale)


# ---------------------------------------------------------------------------------------------
# Sharding: two simulated FSDP ranks (threads) each hold one piece of every tensor; the hook sums
# their partial vectors like a real all_reduce, and the result must equal the unsharded one.


class TwoRankGroup:
    """An in-process all_reduce over threads: every rank blocks until all deposited their vector."""

    def __init__(self, world: int = 2) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[Tensor | None] = [None] * world
        self.calls = [0] * world

    def hook(self, rank: int):
        def all_reduce(partials: Tensor) -> Tensor:
            assert partials.dtype == torch.float32 and partials.dim() == 1
            self.calls[rank] += 1
            self.slots[rank] = partials.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())  # same order on every rank
            self.barrier.wait()  # nobody overwrites a slot before everybody has read it
            return total

        return all_reduce


def shard(grads: list, cuts: list[int]) -> tuple[list, list]:
    first, second = [], []
    for grad, cut in zip(grads, cuts, strict=True):
        if grad is None:
            first.append(None)
            second.append(None)
        else:
            flat = grad.reshape(-1)
            first.append(flat[:cut].clone())
            second.append(flat[cut:].clone())
    return first, second


def run_sharded(name, forget, retain, cuts, **kwargs):
    group = TwoRankGroup()
    shards = list(zip(shard(forget, cuts), shard(retain, cuts), strict=True))
    results: list = [None, None]
    errors: list = []

    def rank_main(rank: int) -> None:
        try:
            syn = get_synthesizer(name, **kwargs)
            results[rank] = syn.combine(shards[rank][0], shards[rank][1], all_reduce_fn=group.hook(rank))
        except BaseException as error:  # surface failures from the thread
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results, group.calls


@pytest.mark.parametrize("name", STRATEGIES)
def test_sharded_equals_unsharded(name):
    forget, retain = make_grads(seed=6, dtype=torch.float32)
    # Make shard-local decisions differ from global ones: each tensor's first half is strongly
    # opposed and its second half strongly aligned, so a per-shard dot product has the wrong sign.
    for f, r in zip(forget, retain, strict=True):
        if f is not None and r is not None and f.numel() > 1:
            half = f.numel() // 2
            f.view(-1)[:half] = -3 * r.view(-1)[:half]
            f.view(-1)[half:] = 5 * r.view(-1)[half:]
    cuts = [
        0 if g is None else (g.numel() // 2 if i % 3 else 0)
        for i, g in enumerate(f if f is not None else r for f, r in zip(forget, retain, strict=True))
    ]
    whole, whole_stats = get_synthesizer(name, alpha=0.6, gamma=1.4).combine(cloned(forget), cloned(retain))
    (first, stats0), (second, stats1) = run_sharded(name, forget, retain, cuts, alpha=0.6, gamma=1.4)[0]
    assert stats0 == stats1  # every rank reports the same numbers
    for key, value in whole_stats.items():
        assert stats0[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for u, a, b in zip(whole, first, second, strict=True):
        if u is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(torch.cat([a, b]).view(u.shape), u, rtol=1e-5, atol=1e-6)


def test_sharded_pcgrad_needs_the_reduced_per_tensor_dot():
    """Shard 0 alone sees a conflict that the whole tensor does not have: no projection anywhere."""
    r = torch.tensor([1.0, 1.0, 1.0, 1.0])
    f = torch.tensor([-1.0, -1.0, 3.0, 3.0])  # <f, r> = 4 > 0, but the first half alone is -2
    (first, stats0), (second, _) = run_sharded("pcgrad", [f], [r], [2])[0]
    assert stats0["projected_fraction"] == 0.0
    torch.testing.assert_close(torch.cat([first[0], second[0]]), f + r)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(pair=gradient_pairs(), data=st.data(), name=st.sampled_from(STRATEGIES))
def test_sharded_equals_unsharded_for_any_cut(pair, data, name):
    forget, retain = pair
    cuts = [data.draw(st.integers(min_value=0, max_value=f.numel())) for f in forget]
    whole, whole_stats = get_synthesizer(name, alpha=0.8, gamma=1.2).combine(cloned(forget), cloned(retain))
    (first, stats0), (second, stats1) = run_sharded(name, forget, retain, cuts, alpha=0.8, gamma=1.2)[0]
    assert stats0 == stats1
    for key in ("conflict_fraction", "cos_forget_retain", "cos_update_retain", "norm_forget", "norm_update"):
        assert stats0[key] == pytest.approx(whole_stats[key], rel=1e-4, abs=1e-4), key
    scale = float(torch.cat(forget).abs().max() + torch.cat(retain).abs().max()) * 20
    for u, a, b in zip(whole, first, second, strict=True):
        torch.testing.assert_close(torch.cat([a, b]), u, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(("name", "expected_calls"), [("sum", 1), ("sago", 1), ("pcgrad", 2), ("blur", 2)])
def test_one_reduction_per_phase(name, expected_calls):
    forget, retain = make_grads(seed=7, dtype=torch.float32)
    cuts = [0 if f is None and r is None else 1 for f, r in zip(forget, retain, strict=True)]
    _, calls = run_sharded(name, forget, retain, cuts)
    assert calls == [expected_calls, expected_calls]
