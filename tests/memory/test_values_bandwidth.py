"""peek_values and adaptive_bandwidth against their loop references."""

import pytest
import torch

from megatron_mosaic.memory import Visibility, adaptive_bandwidth, peek_values
from megatron_mosaic.memory import reference as ref
from tests.memory.helpers import assert_close, grads, random_layout

f64 = torch.float64


@pytest.mark.parametrize("T,eod_prob,with_next", [(1, 0.0, False), (1, 0.5, True), (9, 0.3, True), (30, 0.1, False)])
def test_peek_values_matches_reference(T, eod_prob, with_next):
    gen = torch.Generator().manual_seed(T + 10 * with_next)
    B, H, D = 3, 2, 4
    values = torch.randn(B, H, T, D, generator=gen, dtype=f64, requires_grad=True)
    mix = torch.rand(1, H, 1, 1, generator=gen, dtype=f64, requires_grad=True)
    resets = random_layout(B, T, eod_prob, gen).resets
    next_value = next_resets = None
    if with_next:
        next_value = torch.randn(B, H, 1, D, generator=gen, dtype=f64, requires_grad=True)
        next_resets = torch.tensor([True, False, False])
    leaves = [values, mix] + ([next_value] if with_next else [])
    upstream = torch.randn(B, H, T, D, generator=gen, dtype=f64)
    fast = peek_values(*(t.float() for t in (values, mix)), resets,
                       None if next_value is None else next_value.float(), next_resets)
    slow = ref.peek_values(values, mix, resets, next_value, next_resets)
    assert fast.dtype == torch.float32
    assert_close(fast, slow, what="peek")
    for gf, gs in zip(grads(fast, leaves, upstream), grads(slow, leaves, upstream)):
        assert_close(gf, gs, what="peek grad")


def test_peek_split_with_next_value_equals_whole():
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(2, 3, 12, 4, generator=gen)
    mix = torch.rand(1, 3, 1, 1, generator=gen)
    resets = random_layout(2, 12, 0.3, gen).resets
    whole = peek_values(values, mix, resets)
    first = peek_values(values[:, :, :7], mix, resets[:, :7], values[:, :, 7:8], resets[:, 7])
    second = peek_values(values[:, :, 7:], mix, resets[:, 7:])
    assert torch.equal(torch.cat([first, second], dim=2), whole)
    # A non-finite value behind a document boundary must not leak.
    bad = values.clone()
    bad[:, :, 7] = float("inf")
    out = peek_values(bad[:, :, :7], mix, None, bad[:, :, 7:8], torch.tensor([True, True]))
    assert torch.isfinite(out).all()
    assert peek_values(values.bfloat16(), mix.bfloat16(), resets).dtype == torch.bfloat16


@pytest.mark.parametrize("seq_len,eod_prob,delay,window", [(1, 0.0, 1, None), (20, 0.2, 1, 5), (20, 0.1, 4, None)])
def test_adaptive_bandwidth_matches_reference(seq_len, eod_prob, delay, window):
    gen = torch.Generator().manual_seed(seq_len + delay)
    H = 4
    # Cover both clamps: θ > 10 (β capped at e^10) and |θ_α| > 1 (α capped at 1), negative θ_α.
    theta_0 = torch.tensor([1.5, 12.0, -3.0, 0.0], dtype=f64, requires_grad=True)
    theta_1 = torch.tensor([1.5, 0.2, 11.0, -1.0], dtype=f64, requires_grad=True)
    theta_a = torch.tensor([1 / 3, -0.5, 2.0, 0.0], dtype=f64, requires_grad=True)
    counts = Visibility(delay, window).visible_counts(random_layout(2, seq_len, eod_prob, gen))
    beta = adaptive_bandwidth(theta_0, theta_1, theta_a, counts)
    assert beta.shape == (2, H, seq_len, 1) and beta.dtype == f64
    assert_close(beta, ref.bandwidth(theta_0.detach(), theta_1.detach(), theta_a.detach(), counts), rtol=1e-12)
    # Gradients: finite everywhere (n = 0 included) and equal to finite differences.
    assert torch.autograd.gradcheck(lambda a, b, c: adaptive_bandwidth(a, b, c, counts),
                                    (theta_0, theta_1, theta_a))
    beta32 = adaptive_bandwidth(theta_0.float(), theta_1.float(), theta_a.float(), counts)
    assert beta32.dtype == torch.float32
    assert_close(beta32, beta, rtol=1e-5)


def test_adaptive_bandwidth_head_groups():
    """counts (B, G, T): each group of H/G heads takes its own counts, as G separate calls would."""
    gen = torch.Generator().manual_seed(3)
    layout = random_layout(2, 30, 0.1, gen)
    thetas = [torch.randn(6, generator=gen, dtype=f64) for _ in range(3)]
    rules = [Visibility(1, 5), Visibility(4, None), Visibility(2, 9)]
    counts = torch.stack([r.visible_counts(layout) for r in rules], dim=1)
    grouped = adaptive_bandwidth(*thetas, counts)
    apart = torch.cat([adaptive_bandwidth(*[t[2 * g:2 * g + 2] for t in thetas], counts[:, g]) for g in range(3)], 1)
    assert torch.equal(grouped, apart)
    with pytest.raises(ValueError, match="counts"):
        adaptive_bandwidth(*thetas, torch.cat([counts, counts[:, :1]], dim=1))  # 4 groups of 6 heads


def test_bandwidth_bad_shapes():
    th = torch.zeros(2)
    with pytest.raises(ValueError, match="theta_alpha"):
        adaptive_bandwidth(th, th, torch.zeros(2, 1), torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="counts"):
        adaptive_bandwidth(th, th, th, torch.zeros(3, dtype=torch.int64))
