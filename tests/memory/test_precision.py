"""Under bf16 autocast the memory math stays fp32: the scan, every retrieval path (shifted,
banded, masked, with lse, the CP ring's block math) and their gradients give the fp32 results.

The queries carry bandwidths up to 100, as v2's adaptive β does after training: a bf16 score
near 100 is rounded in steps of 0.5, so any matmul left to autocast shows as a ~5% error here.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mosaic.memory import SequenceLayout, Visibility, associative_recall, linear_recurrence
from megatron_mosaic.memory.precision import compute_dtype, fp32_region
from megatron_mosaic.parallel.cp_recall import ring_associative_recall
from tests.memory.helpers import assert_close, random_layout

B, H, T, D = 2, 2, 300, 8


def _inputs(gen: torch.Generator):
    keys = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=gen), dim=-1)
    queries = keys * (1 + 99 * torch.rand(B, H, T, 1, generator=gen))
    values = torch.randn(B, H, T, D, generator=gen)
    return [t.requires_grad_() for t in (queries, keys, values)]


def _with_grads(fn, inputs, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(out.float().pow(2).sum(), inputs)
    return [out.detach()] + list(grads)


RECALLS = {  # name: (visibility, layout factory, kwargs)
    "shifted": (Visibility(delay=1), None, {}),
    "band": (Visibility(delay=1, window=40), None, {}),
    "banded documents": (Visibility(delay=1, window=16), 0.02, {}),
    "masked documents": (Visibility(delay=5), 0.02, {}),
    "with lse": (Visibility(delay=1), 0.02, {"return_lse": True}),
}


@pytest.mark.parametrize("name", list(RECALLS))
def test_recall_is_fp32_under_bf16_autocast(name):
    gen = torch.Generator().manual_seed(0)
    visibility, eod_prob, kwargs = RECALLS[name]
    layout = None if eod_prob is None else random_layout(B, T, eod_prob, gen)
    inputs = _inputs(gen)

    def fn(q, k, v):
        return associative_recall(q, k, v, visibility, layout, layout, **kwargs)

    for got, want in zip(_with_grads(fn, inputs, True), _with_grads(fn, inputs, False)):
        assert got.dtype == torch.float32
        assert_close(got, want, rtol=1e-5, atol=1e-5, what=name)


def test_ring_block_math_and_scan_are_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(1)
    layout = random_layout(B, T, 0.02, gen)
    inputs = _inputs(gen)

    def ring(q, k, v):
        return ring_associative_recall(q, k, v, Visibility(delay=2), layout, group=None, tile_rows=64)

    def scan(q, k, v):
        return linear_recurrence(v, log_decay=-k[..., :1].abs(), log_gain=4 * q[..., :1], resets=layout.resets)[0]

    for fn in (ring, scan):
        for got, want in zip(_with_grads(fn, inputs, True), _with_grads(fn, inputs, False)):
            assert_close(got, want, rtol=1e-5, atol=1e-5, what=fn.__name__)


def test_precision_helpers():
    x = torch.ones(2)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert (x[None] @ x[:, None]).dtype == torch.bfloat16
        with fp32_region(x.device):
            assert compute_dtype(x) == torch.float32 and (x[None] @ x[:, None]).dtype == torch.float32
    with fp32_region(torch.device("meta")):  # no autocast there: a no-op, not an error
        pass
    assert SequenceLayout.contiguous(1, 2).single_document


def test_fp32_scores_off_leaves_the_kernels_to_autocast():
    """The GPT baseline's attention (fp32_scores=False) runs in autocast's dtype like any
    transformer's; the memories' default does not."""
    gen = torch.Generator().manual_seed(2)
    layout = random_layout(B, T, 0.02, gen)
    q, k, v = (t.detach() for t in _inputs(gen))
    inputs = (q.bfloat16(), k.bfloat16(), v.bfloat16(), Visibility(delay=0), layout, layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = associative_recall(*inputs, fp32_scores=False)
        precise = associative_recall(*inputs)
    exact = associative_recall(q, k, v, Visibility(delay=0), layout, layout)
    assert fast.dtype == precise.dtype == torch.bfloat16
    assert not torch.equal(fast, precise)  # bf16 kernels, not the fp32 region
    assert_close(fast, exact, rtol=0.1, atol=0.1, what="bf16 attention")
