"""The key and value norms' hand-written backwards (memory/features.py) against autograd of the
same formulas, in float64, rows of zeros and broadcast bandwidths included."""

from __future__ import annotations

import pytest
import torch

from megatron_mosaic.memory.features import finish_values, gated_unit_keys

f64 = torch.float64


def _autograd_keys(x: torch.Tensor, beta: torch.Tensor):
    keys = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return keys, keys * beta


def _autograd_values(m: torch.Tensor, theta: torch.Tensor, eps: float):
    return m * (theta.clamp(-15, 15).exp().view(1, -1, 1, 1) / (torch.linalg.vector_norm(m, dim=-1, keepdim=True) + eps))


def _grads(outputs, inputs, weights):
    return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), inputs)


@pytest.mark.parametrize("beta_shape", [(2, 3, 7, 1), (1, 3, 1, 1)], ids=["per-row", "broadcast"])
def test_unit_keys_and_queries_match_autograd(beta_shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 5, generator=gen, dtype=f64) * 3
    x[0, 1, 2] = 0.0  # a zero row: no NaN, the same (clamped) gradient as autograd's
    beta = torch.rand(beta_shape, generator=gen, dtype=f64) + 0.5
    weights = [torch.randn(2, 3, 7, 5, generator=gen, dtype=f64) for _ in range(2)]
    leaves = [t.clone().requires_grad_() for t in (x, beta)]
    ref = _autograd_keys(*leaves)
    ref_grads = _grads(ref, leaves, weights)
    leaves = [t.clone().requires_grad_() for t in (x, beta)]
    keys, queries = gated_unit_keys(leaves[0].float(), leaves[1].float())
    grads = _grads((keys.double(), queries.double()), leaves, weights)
    for got, want in zip((keys, queries, *grads), (*ref, *ref_grads)):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    # keys alone (the Hugging Face model's call), and a loss of the queries alone
    torch.testing.assert_close(gated_unit_keys(x.float()), keys.detach())
    leaves = [t.clone().requires_grad_() for t in (x, beta)]
    (want,) = torch.autograd.grad((_autograd_keys(*leaves)[1] * weights[1]).sum(), leaves[0])
    leaves = [t.clone().requires_grad_() for t in (x, beta)]
    (got,) = torch.autograd.grad((gated_unit_keys(leaves[0].float(), leaves[1].float())[1].double() * weights[1]).sum(),
                                 leaves[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_values_match_autograd():
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(2, 3, 6, 4, generator=gen, dtype=f64)
    m[1, 0, 3] = 0.0
    theta = torch.randn(3, generator=gen, dtype=f64)
    weight = torch.randn(2, 3, 6, 4, generator=gen, dtype=f64)
    leaves = [t.clone().requires_grad_() for t in (m, theta)]
    ref = _autograd_values(*leaves, 1e-10)
    ref_grads = _grads([ref], leaves, [weight])
    leaves = [t.clone().requires_grad_() for t in (m, theta)]
    got = finish_values(leaves[0], leaves[1].float(), version=2)
    grads = _grads([got.double()], leaves, [weight])
    for a, b in zip((got, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=1e-5)
