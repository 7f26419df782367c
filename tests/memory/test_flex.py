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
