"""The FlexAttention path (memory/flex.py) against the float64 references, every rule.

On the CPU torch runs FlexAttention forward only (eagerly), so these tests check outputs and
log-sum-exps; tools/gpu_check.py checks its backward on a GPU against the same references.
"""

from __future__ import annotations

import pytest
import torch

from megatron_mosaic.memory import SequenceLayout, Visibility, associative_recall
from megatron_mosaic.memory import reference as ref
from megatron_mosaic.memory.flex import flex_supported
from tests.memory.helpers import assert_close, random_layout

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
f64 = torch.float64
RULES = [Visibility(1, None), Visibility(1, 5), Visibility(4, None), Visibility(0, None), Visibility(3, 3)]
B, H, D = 2, 2, 8


def _case(kind: str, gen: torch.Generator) -> tuple[SequenceLayout, SequenceLayout]:
    """(query layout, key layout): one document, packed documents, or a CP rank's two chunks
    as queries against another block of keys (Tq != Tk, non-consecutive positions)."""
    if kind == "one document":
        layout = SequenceLayout.contiguous(B, 150)  # more than one 128-row block
        return layout, layout
    if kind == "packed":
        layout = random_layout(B, 150, 0.05, gen)
        return layout, layout
    full = random_layout(B, 64, 0.08, gen)
    queries = full.index_select(torch.cat([torch.arange(16, 24), torch.arange(40, 48)]))
    return queries, full.index_select(torch.arange(0, 40))


@pytest.mark.parametrize("kind", ["one document", "packed", "cp blocks"])
@pytest.mark.parametrize("vis", RULES, ids=str)
def test_flex_matches_reference(vis, kind):
    gen = torch.Generator().manual_seed(vis.delay * 10 + (vis.window or 0))
    ql, kl = _case(kind, gen)
    keys = ref.norm(torch.randn(B, H, kl.seq_len, D, generator=gen, dtype=f64))
    queries = torch.randn(B, H, ql.seq_len, D, generator=gen, dtype=f64) * 5  # β folded in
    values = torch.randn(B, H, kl.seq_len, D, generator=gen, dtype=f64)
    mask = ref.visibility_mask(vis.delay, vis.window, ql.positions, ql.doc_starts, kl.positions, kl.doc_starts)
    y_ref, lse_ref = ref.recall(queries, keys, values, mask)
    q, k, v = (t.float() for t in (queries, keys, values))
    with torch.no_grad():
        y, lse = associative_recall(q, k, v, vis, ql, kl, return_lse=True, backend="flex")
        y_only = associative_recall(q, k, v, vis, ql, kl, backend="flex")
    assert_close(y, y_ref, 1e-4, 1e-5, what="flex recall")
    assert_close(y_only, y_ref, 1e-4, 1e-5, what="recall without lse (the shifted SDPA path where the rule allows)")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))  # empty rows: -inf, output exactly 0
    assert (y[torch.isinf(lse)] == 0).all()
    assert_close(lse.nan_to_num(neginf=0.0), lse_ref.nan_to_num(neginf=0.0), 1e-4, 1e-5, what="flex lse")


def test_backend_choice():
    q = torch.randn(1, 1, 8, 8, requires_grad=True)
    layout = SequenceLayout.from_tokens(torch.tensor([[1, 2, 0, 3, 4, 5, 0, 6]]), 0)
    # The CPU has no FlexAttention backward: explicit flex with a gradient is a clear error ...
    assert not flex_supported(torch.device("cpu"), needs_grad=True)
    with pytest.raises(ValueError, match="backend='sdpa'"):
        associative_recall(q, q, q, Visibility(1), layout, layout, backend="flex")
    with pytest.raises(ValueError, match="backend must be"):
        associative_recall(q, q, q, Visibility(1), layout, layout, backend="triton")
    # ... and the default there is sdpa, which trains.
    associative_recall(q, q, q, Visibility(1), layout, layout).sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("window", [None, 32])
def test_one_compiled_graph_for_every_delay(window):
    """v2 draws its long-term delay anew each step: compiled (as on CUDA), neither the block
    mask nor the kernel may compile again for a new delay (a captured Python int would be a
    constant of the graph: a compilation per value, then eager FlexAttention at dense cost)."""
    from torch._dynamo.testing import CompileCounter
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from megatron_mosaic.memory.flex import BLOCK, rule_mask

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    layout = random_layout(1, 256, 0.01, gen)
    q, k, v = (torch.randn(1, H, 256, D, generator=gen) for _ in range(3))
    mask_graphs, kernel_graphs = CompileCounter(), CompileCounter()  # count graphs, run them eagerly
    build = torch.compile(create_block_mask, backend=mask_graphs, dynamic=False)
    kernel = torch.compile(flex_attention, backend=kernel_graphs, dynamic=False)
    for delay in (3, 5, 9):
        mask = build(rule_mask(layout, layout, delay, window), 1, None, 256, 256, device="cpu", BLOCK_SIZE=BLOCK)
        y, _ = kernel(q, k, v, block_mask=mask, scale=1.0, return_lse=True)
        want = ref.recall(q.double(), k.double(), v.double(), ref.visibility_mask(
            delay, window, layout.positions, layout.doc_starts, layout.positions, layout.doc_starts))[0]
        assert_close(y, want, atol=1e-5, what=f"compiled flex, delay {delay}")
    assert (mask_graphs.frame_count, kernel_graphs.frame_count) == (1, 1)


def test_fewer_queries_than_a_block_take_sdpa_where_flex_is_the_default(monkeypatch):
    """Where FlexAttention is the default (CUDA; here the CPU is made to pretend, forward only),
    a decoding step (one query against the cache) takes sdpa's small explicit mask: it has no
    block to skip, and each new key length would compile another static-shape kernel. A full
    block of queries still goes to FlexAttention. Both match the float64 reference."""
    from megatron_mosaic.memory import retrieval

    calls = []
    flex_recall = retrieval.flex_recall
    monkeypatch.setitem(retrieval.RECALL_BACKEND, "cpu", "flex")
    monkeypatch.setattr(retrieval, "flex_recall", lambda *a, **k: calls.append(a[0].shape[2]) or flex_recall(*a, **k))
    gen = torch.Generator().manual_seed(5)
    full = random_layout(1, 300, 0.01, gen)
    k, v = torch.randn(1, H, 300, D, generator=gen), torch.randn(1, H, 300, D, generator=gen)
    rule = Visibility(delay=2)
    for Tq in (1, 160):
        queries = full.index_select(torch.arange(300 - Tq, 300))
        q = torch.randn(1, H, Tq, D, generator=gen)
        y = associative_recall(q, k, v, rule, queries, full)
        mask = ref.visibility_mask(2, None, queries.positions, queries.doc_starts, full.positions, full.doc_starts)
        assert_close(y, ref.recall(q.double(), k.double(), v.double(), mask)[0], atol=1e-5, what=f"Tq={Tq}")
    assert calls == [160]
