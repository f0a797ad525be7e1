"""synthesis_space: update -- two Adam moment sets, the synthesizer combines Adam directions."""

from __future__ import annotations

import copy
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from retainfirst.engine import TrainConfig, read_metrics, unlearn
from retainfirst.engine.optim import Float32AdamW, UpdateSpaceAdamW
from retainfirst.synthesis import get_synthesizer

HYPER = {"lr": 1e-2, "betas": (0.8, 0.995), "eps": 1e-7, "weight_decay": 0.05}
SHAPES = [(5, 3), (7,), (2, 2, 2)]


def gradient_sequence(steps: int, seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(shape, generator=generator, dtype=torch.float64) * 0.7**t for shape in SHAPES]
        for t in range(steps)
    ]


def initial_weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]


def run_update_space(synthesizer, forget_seq, retain_seq):
    params = [torch.nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = UpdateSpaceAdamW(params, **HYPER)
    for forget, retain in zip(forget_seq, retain_seq, strict=True):
        d_f, d_r = optimizer.precondition([g.clone() for g in forget], [g.clone() for g in retain])
        update, _ = synthesizer.combine(d_f, d_r)
        optimizer.step(update)
    return params, optimizer


def run_adamw(grad_seq, optimizer_class=Float32AdamW):
    params = [torch.nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = optimizer_class(params, **HYPER)
    for grads in grad_seq:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    return params


def assert_float64_equal(ours, reference):
    """Equal up to float64 rounding: (m_hat/denom)*lr vs (lr/bc1)*(m/denom) round differently (~1e-16)."""
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)


def test_retain_only_in_update_space_is_adamw_on_the_retain_gradient():
    forget_seq, retain_seq = gradient_sequence(10, seed=1), gradient_sequence(10, seed=2)
    ours, _ = run_update_space(get_synthesizer("retain_only", alpha=1.0), forget_seq, retain_seq)
    assert_float64_equal(ours, run_adamw(retain_seq))
    assert_float64_equal(ours, run_adamw(retain_seq, torch.optim.AdamW))


def test_forget_side_alone_in_update_space_is_adamw_on_the_forget_gradient():
    forget_seq, retain_seq = gradient_sequence(10, seed=1), gradient_sequence(10, seed=2)
    ours, _ = run_update_space(get_synthesizer("sum", alpha=0.0, gamma=1.0), forget_seq, retain_seq)
    assert_float64_equal(ours, run_adamw(forget_seq))


def test_sum_in_update_space_is_not_adam_on_the_summed_gradient():
    """Sanity: each side gets its own step sizes, so sum(d_f, d_r) != Adam(g_f + g_r)."""
    forget_seq, retain_seq = gradient_sequence(6, seed=1), gradient_sequence(6, seed=2)
    retain_seq = [[10.0 * g for g in grads] for grads in retain_seq]  # very different scales
    ours, _ = run_update_space(get_synthesizer("sum", alpha=1.0, gamma=1.0), forget_seq, retain_seq)
    summed = [
        [f + r for f, r in zip(fs, rs, strict=True)] for fs, rs in zip(forget_seq, retain_seq, strict=True)
    ]
    reference = run_adamw(summed)
    difference = max(float((a - b).detach().abs().max()) for a, b in zip(ours, reference, strict=True))
    assert difference > 1e-3  # ~lr per step: the update space is a different optimizer, not rounding


def test_the_update_is_minus_lr_times_u_after_weight_decay():
    params = [torch.nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = UpdateSpaceAdamW(params, **HYPER)
    before = [p.detach().clone() for p in params]
    update = [torch.full(shape, 0.5, dtype=torch.float64) for shape in SHAPES]
    optimizer.step(update)
    lr, wd = HYPER["lr"], HYPER["weight_decay"]
    for p, w in zip(params, before, strict=True):
        assert torch.equal(p.detach(), w * (1 - lr * wd) - lr * 0.5)


def test_first_directions_are_the_gradient_signs_scaled_by_adam():
    """Step 1: m_hat = g, v_hat = g^2, so d = g / (|g| + eps), for each side on its own."""
    params = [torch.nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = UpdateSpaceAdamW(params, **HYPER)
    forget, retain = gradient_sequence(1, seed=1)[0], gradient_sequence(1, seed=2)[0]
    d_f, d_r = optimizer.precondition(forget, [None, *retain[1:]], forget_scale=0.5)
    for g, d in zip(forget, d_f, strict=True):
        torch.testing.assert_close(d, 0.5 * g / (0.5 * g.abs() + HYPER["eps"]), rtol=1e-14, atol=0)
    assert torch.equal(d_r[0], torch.zeros(SHAPES[0], dtype=torch.float64))  # None reads as zeros
    for g, d in zip(retain[1:], d_r[1:], strict=True):
        torch.testing.assert_close(d, g / (g.abs() + HYPER["eps"]), rtol=1e-14, atol=0)
    assert all(torch.equal(g, h) for g, h in zip(forget, gradient_sequence(1, seed=1)[0], strict=True))


def test_state_holds_both_moment_sets_and_resumes_bit_identically():
    forget_seq, retain_seq = gradient_sequence(8, seed=1), gradient_sequence(8, seed=2)
    synthesizer = get_synthesizer("sago", alpha=0.5, gamma=1.0)
    params, optimizer = run_update_space(synthesizer, forget_seq[:4], retain_seq[:4])
    state = optimizer.state_dict()
    assert set(state["state"][0]) == {"step", *UpdateSpaceAdamW.moment_keys}
    saved_state, saved_params = copy.deepcopy(state), [p.detach().clone() for p in params]

    def continue_from(params_now, optimizer_now):
        for forget, retain in zip(forget_seq[4:], retain_seq[4:], strict=True):
            d_f, d_r = optimizer_now.precondition(forget, retain)
            optimizer_now.step(synthesizer.combine(d_f, d_r)[0])
        return params_now

    straight = continue_from(params, optimizer)
    restored = [torch.nn.Parameter(w.clone()) for w in saved_params]
    fresh = UpdateSpaceAdamW(restored, **HYPER)
    fresh.load_state_dict(saved_state)
    resumed = continue_from(restored, fresh)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def test_bf16_parameters_keep_float32_moments_through_a_resume():
    params = [torch.nn.Parameter(torch.randn(16).to(torch.bfloat16))]
    optimizer = UpdateSpaceAdamW(params, **HYPER)
    grads = [torch.randn(16).to(torch.bfloat16)]
    optimizer.step(get_synthesizer("sum").combine(*optimizer.precondition(grads, grads))[0])
    fresh = UpdateSpaceAdamW(params, **HYPER)
    fresh.load_state_dict(optimizer.state_dict())
    assert all(fresh.state[params[0]][key].dtype == torch.float32 for key in UpdateSpaceAdamW.moment_keys)
    assert params[0].dtype == torch.bfloat16


def state_bytes(optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for key, t in state.items()
        if key != "step"
    )


def test_update_space_moments_take_twice_adamw_state():
    """Measured: 16 bytes per trainable element (four float32 moments) against AdamW's 8."""
    params = [torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16)) for _ in range(3)]
    grads = [torch.ones(1000, dtype=torch.bfloat16) for _ in range(3)]
    update_space = UpdateSpaceAdamW(params, **HYPER)
    d_f, d_r = update_space.precondition(grads, grads)
    adamw = Float32AdamW(params, **HYPER)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    adamw.step()
    assert state_bytes(update_space) == 16 * 3000 == 2 * state_bytes(adamw)
    # the two directions alive while a step is synthesized: float32, 8 bytes per element
    assert sum(d.numel() * d.element_size() for d in d_f + d_r) == 8 * 3000


def test_step_without_updates_raises():
    optimizer = UpdateSpaceAdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(RuntimeError, match="precondition"):
        optimizer.step()


# ---- in the loop --------------------------------------------------------------------------------


def float64_setup(worker):
    model, tokenizer, forget, retain = worker.tiny_setup()
    return model.double(), tokenizer, forget, retain


def config(**overrides) -> TrainConfig:
    base = {
        "steps": 4,
        "lr": 1e-2,
        "weight_decay": 0.01,
        "forget_batch_size": 2,
        "retain_batch_size": 2,
        "forget_loss": "ga",
        "retain_loss": "nll",
        "disable_progress": True,
    }
    return TrainConfig(**{**base, **overrides})


def test_loop_retain_only_update_space_equals_gradient_space_with_clipping(worker, tmp_path):
    """retain_only, clipped at 1: update space (clip g_r, own moments) == AdamW on clipped g_r."""
    results = {}
    for space in ("gradient", "update"):
        model, tokenizer, forget, retain = float64_setup(worker)
        cfg = config(synthesizer="retain_only", alpha=1.0, max_grad_norm=1.0, synthesis_space=space)
        results[space] = unlearn(model, tokenizer, forget, retain, cfg, tmp_path / space)
    records = read_metrics(results["update"].metrics_path)
    assert records[0]["norm_retain_raw"] > 1.0  # clipping was active
    ours = dict(results["update"].model.named_parameters())
    for name, p in results["gradient"].model.named_parameters():
        torch.testing.assert_close(ours[name], p, rtol=1e-10, atol=1e-12)
    assert all(name.startswith("model.") or name.startswith("lm_head") for name in ours)


def test_loop_update_space_resumes_bit_identically(worker, tmp_path):
    cfg = config(synthesizer="sago", alpha=0.5, checkpoint_every=2, synthesis_space="update")
    model, tokenizer, forget, retain = worker.tiny_setup()
    full = unlearn(model, tokenizer, forget, retain, cfg, tmp_path / "full")
    records = read_metrics(full.metrics_path)
    assert all(r["cos_step_retain"] is not None and "norm_forget_raw" in r for r in records)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-4")
    (resumed_dir / "checkpoints" / "latest").write_text("step-2\n")
    model, tokenizer, forget, retain = worker.tiny_setup()
    resumed = unlearn(model, tokenizer, forget, retain, cfg, resumed_dir, resume=True)
    again = dict(resumed.model.named_parameters())
    assert all(torch.equal(p, again[name]) for name, p in full.model.named_parameters())


def test_gradient_and_update_space_checkpoints_do_not_mix(worker, tmp_path):
    from retainfirst.errors import RetainFirstError

    model, tokenizer, forget, retain = worker.tiny_setup()
    unlearn(model, tokenizer, forget, retain, config(steps=1, synthesis_space="update"), tmp_path)
    model, tokenizer, forget, retain = worker.tiny_setup()
    with pytest.raises(RetainFirstError, match="synthesis_space"):
        unlearn(model, tokenizer, forget, retain, config(steps=2), tmp_path, resume=True)


@pytest.mark.multiprocess
def test_update_space_under_fsdp2_matches_one_process(tmp_path):
    """Two FSDP2 ranks (uneven shards, float64) keep per-shard moments and reduce the norms: same run."""
    spec = importlib.util.spec_from_file_location(
        "retainfirst_fsdp2_tests", Path(__file__).with_name("test_fsdp2.py")
    )
    fsdp2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fsdp2)
    for code, err in fsdp2.wait_all(fsdp2.launch(["-c", fsdp2.PROBE]), timeout=120):
        if code != 0:
            pytest.skip(f"FSDP2 does not run on CPU/gloo here: {err.strip().splitlines()[-1:]}")
    common = ["--steps", "3", "--synthesizers", "sago", "--synthesis-space", "update"]
    procs = fsdp2.launch([str(fsdp2.WORKER), "--out", str(tmp_path / "fsdp"), "--fsdp", *common])
    for code, err in fsdp2.wait_all(procs):
        assert code == 0, err[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = [
            "--out",
            str(tmp_path / "single"),
            *common,
            "--forget-batch-size",
            "4",
            "--retain-batch-size",
            "4",
        ]
        fsdp2.load_worker().main(args)
    finally:
        torch.set_num_threads(threads)
    sharded, single = (
        fsdp2.final_weights(tmp_path / "fsdp" / "sago"),
        fsdp2.final_weights(tmp_path / "single" / "sago"),
    )
    for name, tensor in single.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-12, atol=1e-15, msg=name)
    keys = (*fsdp2.STAT_KEYS, "norm_forget_raw", "norm_retain_raw")
    for a, b in zip(
        fsdp2.records(tmp_path / "fsdp" / "sago"), fsdp2.records(tmp_path / "single" / "sago"), strict=True
    ):
        assert {k: a[k] for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-6, abs=1e-12)
