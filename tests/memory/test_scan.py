"""linear_recurrence (chunked log-space scan) against the step-by-step float64 recurrence."""

import pytest
import torch

from megatron_mosaic.memory import RecurrenceState, linear_recurrence
from megatron_mosaic.memory import reference as ref
from tests.memory.helpers import assert_close, grads, random_layout

f64 = torch.float64


def _inputs(B, H, T, D, gain_scale, gen, per_step_decay=True):
    x = torch.randn(B, H, T, D, generator=gen, dtype=f64)
    if per_step_decay:
        a = -torch.rand(B, H, T, 1, generator=gen, dtype=f64) * 3
    else:  # v1: one constant -λ_h per head
        a = -torch.rand(1, H, 1, 1, generator=gen, dtype=f64) * 3
    g = (torch.rand(B, H, T, 1, generator=gen, dtype=f64) * 2 - 1) * gain_scale
    return x, a, g


def _run_both(x, a, g, resets, init, chunk, upstream, loss="value"):
    """Fast (fp32) and reference (fp64) h_t or Norm(h_t), with gradients w.r.t. every input."""
    leaves64 = [t.clone().requires_grad_() for t in (x, a, g) + ((init.value, init.log_scale) if init else ())]
    leaves32 = [t.float().clone().requires_grad_() for t in leaves64]
    init64 = init32 = None
    if init is not None:
        init64 = leaves64[3] * torch.exp(leaves64[4])
        init32 = RecurrenceState(leaves32[3], leaves32[4])
    h_ref = ref.recurrence(*leaves64[:3], resets=resets, initial_state=init64)
    scaled, log_scale, final = linear_recurrence(*leaves32[:3], resets=resets, initial_state=init32,
                                                 chunk_size=chunk)
    assert scaled.dtype == torch.float32 and log_scale.dtype == torch.float32
    assert torch.isfinite(scaled).all() and torch.isfinite(log_scale).all()
    if loss == "value":
        fast, slow = scaled * torch.exp(log_scale), h_ref
    else:  # Norm(h): what the key extractor uses; independent of the per-row scale
        fast, slow = ref.norm(scaled), ref.norm(h_ref)
    return fast, slow, grads(fast, leaves32, upstream), grads(slow, leaves64, upstream), final, h_ref


@pytest.mark.parametrize(
    "T,chunk,eod_prob,with_init",
    [(1, 4, 0.0, True), (3, 4, 0.3, False), (17, 4, 0.2, True), (64, 16, 0.05, True), (64, 64, 0.0, False),
     (130, 8, 0.1, True), (41, 1, 0.2, False), (200, 64, 0.02, True)],
)
def test_scan_matches_reference(T, chunk, eod_prob, with_init):
    gen = torch.Generator().manual_seed(1000 + T * 7 + chunk)
    B, H, D = 2, 3, 5
    x, a, g = _inputs(B, H, T, D, 1.0, gen)
    resets = random_layout(B, T, eod_prob, gen).resets
    if with_init:  # drop the forced reset at 0 so the initial state is actually used
        resets[0, 0] = False
    init = RecurrenceState(torch.randn(B, H, D, generator=gen, dtype=f64),
                           torch.randn(B, H, 1, generator=gen, dtype=f64)) if with_init else None
    upstream = torch.randn(B, H, T, D, generator=gen, dtype=f64)
    fast, slow, g_fast, g_slow, final, h_ref = _run_both(x, a, g, resets, init, chunk, upstream)
    assert_close(fast, slow, atol=1e-4, what="h")
    assert_close(final.materialize(), h_ref[:, :, -1], what="final state")
    for name, gf, gs in zip(["x", "log_decay", "log_gain", "init.value", "init.log_scale"], g_fast, g_slow):
        assert_close(gf, gs, rtol=1e-4, atol=1e-4, what=f"grad {name}")


def test_v1_constant_decay_broadcast_and_no_gain():
    gen = torch.Generator().manual_seed(7)
    x, a, _ = _inputs(2, 4, 50, 3, 0.0, gen, per_step_decay=False)
    scaled, log_scale, _ = linear_recurrence(x.float(), a.float(), chunk_size=16)
    assert_close(scaled * torch.exp(log_scale), ref.recurrence(x, a), what="v1 leaky average")


@pytest.mark.parametrize("gain_scale,T,chunk", [(80.0, 70, 8), (80.0, 9, 64), (300.0, 33, 4)])
def test_extreme_gains_norm_matches_float64(gain_scale, T, chunk):
    gen = torch.Generator().manual_seed(int(gain_scale) + T)
    B, H, D = 2, 2, 4
    x, a, g = _inputs(B, H, T, D, gain_scale, gen)
    g[:, :, ::5] = gain_scale  # make sure the extremes ±gain_scale are hit
    g[:, :, 1::5] = -gain_scale
    resets = random_layout(B, T, 0.1, gen).resets
    upstream = torch.randn(B, H, T, D, generator=gen, dtype=f64)
    if gain_scale > 200:  # exp(300) overflows float64 too: forward only, against a shifted reference
        scaled, log_scale, final = linear_recurrence(x.float(), a.float(), g.float(), resets, chunk_size=chunk)
        assert torch.isfinite(scaled).all() and torch.isfinite(final.value).all()
        assert_close(ref.norm(scaled), ref.norm(ref.recurrence(x, a, g - gain_scale, resets)), atol=1e-5)
        return
    fast, slow, g_fast, g_slow, _, _ = _run_both(x, a, g, resets, None, chunk, upstream, loss="norm")
    assert_close(fast, slow, atol=1e-5, what="Norm(h)")
    for name, gf, gs in zip(["x", "log_decay", "log_gain"], g_fast, g_slow):
        assert torch.isfinite(gf).all()
        assert_close(gf, gs, rtol=1e-3, atol=1e-4, what=f"grad {name}")


@pytest.mark.parametrize("T,split,chunk", [(50, 1, 8), (50, 23, 8), (64, 32, 16), (9, 8, 4)])
def test_state_chaining_equals_whole(T, split, chunk):
    gen = torch.Generator().manual_seed(T * split)
    B, H, D = 2, 3, 4
    x, a, g = (t.float() for t in _inputs(B, H, T, D, 20.0, gen))
    resets = random_layout(B, T, 0.1, gen).resets
    whole_s, whole_l, whole_final = linear_recurrence(x, a, g, resets, chunk_size=chunk)
    s1, l1, st = linear_recurrence(x[:, :, :split], a[:, :, :split], g[:, :, :split], resets[:, :split],
                                   chunk_size=chunk)
    s2, l2, final = linear_recurrence(x[:, :, split:], a[:, :, split:], g[:, :, split:], resets[:, split:],
                                      initial_state=st, chunk_size=chunk)
    got = torch.cat([s1.double() * torch.exp(l1.double()), s2.double() * torch.exp(l2.double())], dim=2)
    assert_close(got, whole_s.double() * torch.exp(whole_l.double()), rtol=1e-5, what="chained h")
    assert_close(final.materialize(), whole_final.materialize(), rtol=1e-5, what="final state")


def test_reset_at_zero_drops_initial_state_and_bf16_runs():
    gen = torch.Generator().manual_seed(3)
    x, a, g = (t.float() for t in _inputs(1, 2, 10, 3, 1.0, gen))
    init = RecurrenceState(torch.full((1, 2, 3), 1e3), torch.zeros(1, 2, 1))
    resets = torch.zeros(1, 10, dtype=torch.bool)
    resets[0, 0] = True
    with_init = linear_recurrence(x, a, g, resets, initial_state=init)
    without = linear_recurrence(x, a, g, resets)
    assert torch.equal(with_init[0], without[0])
    s16, l16, f16 = linear_recurrence(x.bfloat16(), a.bfloat16(), g.bfloat16(), resets)
    assert s16.dtype == torch.bfloat16 and l16.dtype == torch.float32 and f16.value.dtype == torch.float32
    s32, l32, _ = linear_recurrence(x.bfloat16().float(), a.bfloat16().float(), g.bfloat16().float(), resets)
    assert_close(s16.float() * torch.exp(l16), s32 * torch.exp(l32), rtol=2e-2, atol=2e-2, what="bf16")


def test_bad_shapes_raise():
    x = torch.zeros(1, 2, 5, 3)
    with pytest.raises(ValueError, match="log_decay"):
        linear_recurrence(x, torch.zeros(1, 3, 5, 1))
    with pytest.raises(ValueError, match="resets"):
        linear_recurrence(x, torch.zeros(1, 2, 5, 1), resets=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="initial_state"):
        linear_recurrence(x, torch.zeros(1, 2, 5, 1), initial_state=RecurrenceState(torch.zeros(1, 2, 4),
                                                                                    torch.zeros(1, 2, 1)))
