"""associative_recall / merge_partial_recalls / Visibility against full-matrix float64 references."""

import pytest
import torch

from megatron_mosaic.memory import SequenceLayout, Visibility, associative_recall, merge_partial_recalls
from megatron_mosaic.memory import reference as ref
from tests.memory.helpers import assert_close, grads, random_layout

f64 = torch.float64
RULES = [Visibility(1, None), Visibility(1, 1), Visibility(1, 2), Visibility(1, 5), Visibility(1, 64),
         Visibility(3, None), Visibility(9, None), Visibility(0, None), Visibility(3, 3)]


def _ref_mask(vis, ql, kl):
    return ref.visibility_mask(vis.delay, vis.window, ql.positions, ql.doc_starts, kl.positions, kl.doc_starts)


def _qkv(B, H, Tq, Tk, D, gen, scale=1.0):
    q = torch.randn(B, H, Tq, D, generator=gen, dtype=f64) * scale
    k = torch.randn(B, H, Tk, D, generator=gen, dtype=f64)
    v = torch.randn(B, H, Tk, D, generator=gen, dtype=f64)
    return q, k, v


def _check(q, k, v, vis, ql, kl, mask, return_lse, gen, tol=(1e-4, 1e-5)):
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves32 = [t.float().clone().requires_grad_() for t in (q, k, v)]
    y_ref, lse_ref = ref.recall(*leaves64, mask)
    out = associative_recall(*leaves32, vis, ql, kl, return_lse=return_lse)
    y = out[0] if return_lse else out
    upstream = torch.randn(y_ref.shape, generator=gen, dtype=f64)
    assert torch.isfinite(y).all()
    assert_close(y, y_ref, *tol, what="recall")
    loss_fast, loss_ref = (y * upstream.float()).sum(), (y_ref * upstream).sum()
    if return_lse:
        lse = out[1]
        assert lse.dtype == torch.float32 and lse.shape == y.shape[:3]
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and not torch.isnan(lse).any()
        assert_close(lse.nan_to_num(neginf=0.0), lse_ref.nan_to_num(neginf=0.0), *tol, what="lse")
        u2 = torch.randn(lse.shape, generator=gen, dtype=f64)
        loss_fast = loss_fast + torch.where(torch.isinf(lse), 0.0, lse * u2.float()).sum()
        loss_ref = loss_ref + torch.where(torch.isinf(lse_ref), 0.0, lse_ref * u2).sum()
    g_fast = torch.autograd.grad(loss_fast, leaves32)
    g_ref = torch.autograd.grad(loss_ref, leaves64)
    for name, gf, gs in zip("qkv", g_fast, g_ref):
        assert torch.isfinite(gf).all()
        assert_close(gf, gs, 1e-4, 1e-4, what=f"grad {name}")
    return y


@pytest.mark.parametrize("vis", RULES, ids=str)
# T = 90: one document's causal rules go in two query blocks on the CPU (CAUSAL_SPLIT_BELOW)
@pytest.mark.parametrize("T,layout_kind", [(1, "none"), (4, "none"), (23, "none"), (23, "given"), (30, "docs"),
                                           (7, "docs"), (90, "none")])
def test_recall_matches_reference(vis, T, layout_kind):
    gen = torch.Generator().manual_seed(T * 100 + vis.delay * 10 + (vis.window or 0))
    B, H, D = 2, 2, 6
    q, k, v = _qkv(B, H, T, T, D, gen, scale=2.0)
    if layout_kind == "docs":
        layout = random_layout(B, T, 0.2, gen)
    else:
        layout = SequenceLayout.contiguous(B, T)
    passed = None if layout_kind == "none" else layout
    mask = _ref_mask(vis, layout, layout)
    assert torch.equal(vis.mask(layout, layout), mask)
    assert torch.equal(vis.visible_counts(layout), mask.sum(dim=-1)[:, 0])
    for return_lse in (False, True):
        y = _check(q, k, v, vis, passed, passed, mask, return_lse, gen)
        empty = ~mask.any(dim=-1).expand(B, H, T)
        assert (y[empty] == 0).all()


def test_contiguous_fast_path_builds_no_mask(monkeypatch):
    def no_mask(*args, **kwargs):
        raise AssertionError("the contiguous single-document path must not build a visibility mask")

    monkeypatch.setattr(Visibility, "mask", no_mask)
    q = torch.randn(1, 2, 10, 4)
    layout = SequenceLayout.contiguous(1, 10)
    for vis in (Visibility(1, None), Visibility(4, None), Visibility(1, 3)):
        associative_recall(q, q, q, vis)
        associative_recall(q, q, q, vis, layout, layout)
    # A consecutive run inside one later document (a context-parallel chunk) is the same shape.
    chunk = SequenceLayout(layout.positions + 50, torch.full_like(layout.positions, 20), 100)
    associative_recall(q, q, q, Visibility(1, None), chunk, chunk)


def test_empty_rows_exactly_zero_with_zero_gradients():
    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 2, 12, 4
    tokens = torch.tensor([[5, 5, 5, 0, 5, 0, 0, 5, 5, 5, 5, 5]])
    layout = SequenceLayout.from_tokens(tokens, 0)
    for vis, passed in ((Visibility(3, None), None), (Visibility(1, None), layout), (Visibility(2, 4), layout)):
        q, k, v = (t.float().requires_grad_() for t in _qkv(B, H, T, T, D, gen, scale=30.0))
        y = associative_recall(q, k, v, vis, passed, passed)
        ll = passed or SequenceLayout.contiguous(B, T)
        empty = vis.visible_counts(ll)[0] == 0
        assert empty.any() and (y[:, :, empty] == 0).all()
        gq, = torch.autograd.grad(y.sum(), q)
        assert torch.isfinite(gq).all() and (gq[:, :, empty] == 0).all()


def _cp_layouts(B, T, cp, rank, gen):
    """Load-balanced context parallel split: 2·cp chunks, rank r holds chunks r and 2cp-1-r."""
    full = random_layout(B, T, 0.15, gen)
    c = T // (2 * cp)
    chunks = [torch.arange(i * c, (i + 1) * c) for i in range(2 * cp)]
    local = torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])
    return full, local, chunks


@pytest.mark.parametrize("vis", [Visibility(1, None), Visibility(1, 5), Visibility(7, None)], ids=str)
@pytest.mark.parametrize("rank", [0, 1])
def test_general_layouts_and_lse_merge_equal_full_recall(vis, rank):
    gen = torch.Generator().manual_seed(31 + rank + vis.delay)
    B, H, T, D, cp = 2, 2, 32, 5, 2
    full, local, chunks = _cp_layouts(B, T, cp, rank, gen)
    q, k, v = _qkv(B, H, T, T, D, gen, scale=2.0)
    ql = full.index_select(local)
    q_local = q[:, :, local]
    mask = _ref_mask(vis, ql, full)
    # Queries and keys from different position sets, in one call (masked SDPA) and in 4 key blocks.
    _check(q_local, k, v, vis, ql, full, mask, False, gen)
    leaves64 = [t.clone().requires_grad_() for t in (q_local, k, v)]
    leaves32 = [t.float().clone().requires_grad_() for t in (q_local, k, v)]
    parts = [associative_recall(leaves32[0], leaves32[1][:, :, idx], leaves32[2][:, :, idx], vis, ql,
                                full.index_select(idx), return_lse=True) for idx in chunks]
    y, lse = merge_partial_recalls([p[0] for p in parts], [p[1] for p in parts])
    y_ref, lse_ref = ref.recall(*leaves64, mask)
    assert_close(y, y_ref, what="merged recall")
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    assert_close(lse.nan_to_num(neginf=0.0), lse_ref.nan_to_num(neginf=0.0), what="merged lse")
    # Merging is associative: (0,1) then (2,3) then both.
    y01, l01 = merge_partial_recalls([parts[0][0], parts[1][0]], [parts[0][1], parts[1][1]])
    y23, l23 = merge_partial_recalls([parts[2][0], parts[3][0]], [parts[2][1], parts[3][1]])
    y2, _ = merge_partial_recalls([y01, y23], [l01, l23])
    assert_close(y2, y, rtol=1e-5, atol=1e-6, what="associativity")
    upstream = torch.randn(y_ref.shape, generator=gen, dtype=f64)
    g_fast = grads(y, leaves32, upstream)
    g_ref = grads(y_ref, leaves64, upstream)
    for name, gf, gs in zip("qkv", g_fast, g_ref):
        assert torch.isfinite(gf).all()
        assert_close(gf, gs, 1e-4, 1e-4, what=f"merged grad {name}")


def test_merge_all_empty_rows_zero_and_finite_grads():
    out = [torch.randn(1, 1, 3, 2, requires_grad=True) for _ in range(2)]
    lse_a = torch.tensor([[[float("-inf"), 0.5, float("-inf")]]], requires_grad=True)
    lse_b = torch.tensor([[[float("-inf"), float("-inf"), 1.0]]], requires_grad=True)
    y, lse = merge_partial_recalls(out, [lse_a, lse_b])
    assert (y[:, :, 0] == 0).all() and torch.isinf(lse[0, 0, 0])
    assert torch.equal(y[:, :, 1], out[0][:, :, 1].detach()) and torch.equal(y[:, :, 2], out[1][:, :, 2].detach())
    gs = torch.autograd.grad(y.sum() + lse[:, :, 1:].sum(), out + [lse_a, lse_b])
    assert all(torch.isfinite(g).all() for g in gs)


@pytest.mark.parametrize("vis", [Visibility(1, None), Visibility(1, 6), Visibility(4, None)], ids=str)
def test_bf16_inputs_run(vis):
    gen = torch.Generator().manual_seed(4)
    B, H, T, D = 2, 2, 40, 8
    q, k, v = (t.float() for t in _qkv(B, H, T, T, D, gen))
    docs = random_layout(B, T, 0.1, gen)
    for layout in (None, docs):
        want = associative_recall(q, k, v, vis, layout, layout)
        got = associative_recall(q.bfloat16(), k.bfloat16(), v.bfloat16(), vis, layout, layout)
        assert got.dtype == torch.bfloat16
        assert_close(got, want, rtol=5e-2, atol=5e-2, what="bf16")
        got, lse = associative_recall(q.bfloat16(), k.bfloat16(), v.bfloat16(), vis, layout, layout, True)
        assert got.dtype == torch.bfloat16 and lse.dtype == torch.float32
        assert_close(got, want, rtol=5e-2, atol=5e-2, what="bf16 lse path")


def test_bad_arguments_raise():
    q = torch.zeros(1, 2, 5, 3)
    layout = SequenceLayout.contiguous(1, 5)
    with pytest.raises(ValueError, match="delay"):
        Visibility(-1)
    with pytest.raises(ValueError, match="window"):
        Visibility(1, 0)
    with pytest.raises(ValueError, match="both"):
        associative_recall(q, q, q, Visibility(), layout, None)
    with pytest.raises(ValueError, match="Tq=5 != Tk=4"):
        associative_recall(q, q[:, :, :4], q[:, :, :4], Visibility())
    with pytest.raises(ValueError, match="query_layout"):
        associative_recall(q, q, q, Visibility(), SequenceLayout.contiguous(1, 4), layout)


@pytest.mark.parametrize("L,width,min_block", [(1, 1, 3), (10, 1, 3), (17, 4, 3), (17, 5, 4), (30, 29, 4),
                                               (23, 40, 4)])
def test_banded_blocks_match_reference(L, width, min_block):
    from megatron_mosaic.memory.runs import _banded

    gen = torch.Generator().manual_seed(L * width)
    q, k, v = _qkv(2, 2, L, L, 3, gen, scale=2.0)
    # Row j sees [j - width + 1, j]: Visibility(delay=0, window=width) on one contiguous document.
    layout = SequenceLayout.contiguous(2, L)
    mask = _ref_mask(Visibility(0, width), layout, layout)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves32 = [t.float().clone().requires_grad_() for t in (q, k, v)]
    y_ref, _ = ref.recall(*leaves64, mask)
    y = _banded(*leaves32, 0, width, min_block=min_block)
    assert_close(y, y_ref, what="banded")
    upstream = torch.randn(y.shape, generator=gen, dtype=f64)
    for gf, gs in zip(grads(y, leaves32, upstream), grads(y_ref, leaves64, upstream)):
        assert_close(gf, gs, 1e-4, 1e-4, what="banded grad")


@pytest.mark.parametrize("T,banded", [(192, True), (100, False)])
def test_short_term_window_over_several_blocks(T, banded, monkeypatch):
    from megatron_mosaic.memory import runs

    calls = []
    real = runs._banded
    monkeypatch.setattr(runs, "_banded", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(11)
    # width 19 < 32: blocks of >= 32 queries; T = 192 spans 5 (banded), T = 100 spans 3 (one dense band)
    vis = Visibility(1, 20)
    q, k, v = _qkv(1, 2, T, T, 4, gen, scale=2.0)
    layout = SequenceLayout.contiguous(1, T)
    _check(q, k, v, vis, None, None, _ref_mask(vis, layout, layout), False, gen)
    assert bool(calls) == banded


@pytest.mark.parametrize("vis", [Visibility(1, None), Visibility(4, None), Visibility(2, 9), Visibility(0, 1)], ids=str)
def test_consecutive_blocks_match_reference(vis, monkeypatch):
    """Packed documents, shifted rows in query blocks of 7 (each reading only the keys its rows
    can see) against the full reference, gradients included."""
    from megatron_mosaic.memory import runs

    monkeypatch.setattr(runs, "CAUSAL_BLOCK_ROWS", 7)
    monkeypatch.setattr(runs, "BANDED_MIN_BLOCKS", 10**6)  # windows too: not the banded path
    monkeypatch.setattr(Visibility, "mask", lambda *a: (_ for _ in ()).throw(AssertionError("dense mask built")))
    gen = torch.Generator().manual_seed(7 + vis.delay)
    layout = random_layout(2, 45, 0.1, gen)
    q, k, v = _qkv(2, 2, 45, 45, 4, gen, scale=2.0)
    mask = _ref_mask(vis, layout, layout)
    y = _check(q, k, v, vis, layout, layout, mask, False, gen)
    assert (y[~mask.any(dim=-1).expand_as(y[..., 0])] == 0).all()


@pytest.mark.parametrize("vis,T,min_block", [(Visibility(1, 20), 200, 32), (Visibility(1, 5), 60, 4),
                                             (Visibility(3, 9), 61, 4), (Visibility(1, 2), 33, 3)], ids=str)
def test_banded_documents_match_reference(vis, T, min_block, monkeypatch):
    """Packed documents + a window: the banded path (no (T, T) mask) against the full reference."""
    from megatron_mosaic.memory import retrieval

    gen = torch.Generator().manual_seed(T + vis.window)
    layout = random_layout(2, T, 0.05, gen)
    q, k, v = _qkv(2, 2, T, T, 4, gen, scale=2.0)
    mask = _ref_mask(vis, layout, layout)
    assert (layout.doc_starts > 0).any(dim=1).all()  # several documents in every row
    real = retrieval.banded_documents
    taken = []

    def banded(*args, **kwargs):
        out = real(*args, **{**kwargs, "min_block": min_block})
        taken.append(out is not None)
        return out

    monkeypatch.setattr(retrieval, "banded_documents", banded)
    monkeypatch.setattr(Visibility, "mask", lambda *a: (_ for _ in ()).throw(AssertionError("dense mask built")))
    y = _check(q, k, v, vis, layout, layout, mask, False, gen)
    assert taken == [True]
    empty = ~mask.any(dim=-1).expand_as(y[..., 0])
    assert (y[empty] == 0).all()


@pytest.mark.parametrize("vis", [Visibility(1, None), Visibility(3, None), Visibility(1, 6), Visibility(2, 9)], ids=str)
def test_one_document_query_blocks_match_reference(vis):
    """runs.consecutive_recall without document starts, in query blocks of 8 (the first without
    a window read as is_causal), windows included, against the full reference."""
    from megatron_mosaic.memory.runs import consecutive_recall

    gen = torch.Generator().manual_seed(5 + vis.delay)
    T = 30
    q, k, v = _qkv(2, 2, T, T, 4, gen, scale=2.0)
    layout = SequenceLayout.contiguous(2, T)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves32 = [t.float().clone().requires_grad_() for t in (q, k, v)]
    y_ref, _ = ref.recall(*leaves64, _ref_mask(vis, layout, layout))
    y = consecutive_recall(*leaves32, None, vis.delay, vis.window, block_rows=8)
    assert_close(y, y_ref, what="one-document blocks")
    upstream = torch.randn(y.shape, generator=gen, dtype=f64)
    for gf, gs in zip(grads(y, leaves32, upstream), grads(y_ref, leaves64, upstream)):
        assert_close(gf, gs, 1e-4, 1e-4, what="one-document blocks grad")
