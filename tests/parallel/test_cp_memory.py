"""Context-parallel memory primitives equal the single-device memory math on the full sequence.

Single-process tests here (split, schedule, block math). The multi-process (gloo) checks in
``memory_checks`` run inside the spawns of test_cp_model.py (CP=2 and CP=4): the drop-in
``megatron_mosaic.parallel`` functions under Megatron's CP group against ``megatron_mosaic.memory``
on the unsplit sequence, outputs and the gradients w.r.t. every input (queries, keys, values,
gates, mix, bandwidth parameters).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mosaic import memory, parallel
from megatron_mosaic.memory import SequenceLayout, Visibility
from megatron_mosaic.memory import reference as ref
from megatron_mosaic.parallel import ChunkPlan, split_for_context_parallel
from megatron_mosaic.parallel.cp_recall import message_segments, ring_associative_recall
from tests.parallel.cp_checks import Splitter, assert_close, packed_tokens

# Rules exercised: v1 contextual, STM windows shorter/longer than a chunk (halo over two chunks),
# LTM delays shorter/longer than a chunk, the baseline's causal rule (delay 0), a window and a
# delay longer than the whole sequence (T < h, T < m), and window + delay together.
RULES = [
    Visibility(1), Visibility(1, 2), Visibility(1, 5), Visibility(2), Visibility(4), Visibility(0),
    Visibility(1, 100), Visibility(100), Visibility(2, 4),
]


# ------------------------------------------------------------------ single process, no spawn


def test_split_layout_and_errors():
    tokens = packed_tokens(2, 12, [[2, 7], [5]])
    layout = SequenceLayout.from_tokens(tokens, 0)
    local, parts = split_for_context_parallel(layout, {"tokens": tokens, "none": None}, 2, 1)
    # rank 1 of 2 holds chunks 1 and 2 of 4 (3 tokens each): global positions 3..8
    assert local.positions[0].tolist() == [3, 4, 5, 6, 7, 8]
    assert torch.equal(local.doc_starts, layout.doc_starts[:, 3:9])
    assert torch.equal(parts["tokens"], tokens[:, 3:9]) and parts["none"] is None
    assert local.total_length == 12
    assert ChunkPlan(12, 2, 0).global_index().tolist() == [0, 1, 2, 9, 10, 11]
    with pytest.raises(ValueError, match=r"T=10 must be a multiple of 2\*context_parallel_size=4"):
        ChunkPlan(10, 2, 0)
    with pytest.raises(ValueError, match="tensor 'labels' has 11 entries"):
        split_for_context_parallel(layout, {"labels": tokens[:, :11]}, 2, 0)
    # the ring checks that the layout is this rank's share of the sequence
    q = torch.randn(2, 1, 6, 4)
    with pytest.raises(ValueError, match="holds 6 tokens but total_length 12"):
        ring_associative_recall(q, q, q, Visibility(1), SequenceLayout(local.positions, local.doc_starts, 12), None)
    shuffled = SequenceLayout(local.positions.flip(1), local.doc_starts, 6)
    with pytest.raises(ValueError, match="not this rank's load-balanced chunks"):
        ring_associative_recall(q, q, q, Visibility(1), shuffled, None)


def test_schedule_moves_only_visible_rows():
    """Rows the rule can never show are not sent: halos for windows, nothing for long delays."""
    plan = ChunkPlan(4 * 16, 4, 1)  # 8 chunks of 8 (positions), rank 1 holds chunks 1 and 6

    def lengths(vis: Visibility, sender: int, receiver: int) -> list[tuple[int, int]]:
        return [(loc.start, loc.length) for loc, _ in message_segments(plan, vis, sender, receiver)]

    window = Visibility(1, 4)  # short-term: h-1 = 3 previous pairs
    # rank 1 (chunks 1, 6) needs the last 3 rows of chunk 0 (rank 0) and of chunk 5 (rank 2)
    assert lengths(window, 0, 1) == [(5, 3)]
    assert lengths(window, 2, 1) == [(45, 3)]
    assert lengths(window, 3, 1) == []  # chunks 3 and 4: never within the window of 1 or 6
    long = Visibility(20)  # long-term, m = 20: query chunk 6 (48..55) sees keys <= 35
    assert lengths(long, 0, 1) == [(0, 8)]  # chunk 7 (56..63) is after every query
    assert lengths(long, 3, 1) == [(24, 8), (32, 4)]  # chunk 4 only up to position 35
    assert lengths(Visibility(100), 0, 1) == []  # T < m: nothing is ever sent
    assert lengths(Visibility(0), 2, 1) == [(16, 8), (40, 8)]  # causal: all earlier rows


def test_ring_block_math_single_rank_tiles():
    """CP=1 ring (tiles of 1, 2, 5 rows and one tile) equals the float64 reference recall."""
    torch.manual_seed(0)
    layout = SequenceLayout.from_tokens(packed_tokens(2, 12, [[2, 7], [5]]), 0)
    for vis in RULES:
        q, k, v = (torch.randn(2, 2, 12, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        mask = ref.visibility_mask(vis.delay, vis.window, layout.positions, layout.doc_starts,
                                   layout.positions, layout.doc_starts)
        want, _ = ref.recall(q, k, v, mask)
        grad = torch.randn_like(want)
        want_grads = torch.autograd.grad((want * grad).sum(), (q, k, v))
        for rows in (1, 2, 5, None):
            got = ring_associative_recall(q, k, v, vis, layout, None, tile_rows=rows)
            got_grads = torch.autograd.grad((got * grad).sum(), (q, k, v))
            assert_close(f"{vis} rows={rows} y", got, want, 1e-12, 1e-12)
            for name, g, w in zip("qkv", got_grads, want_grads):
                assert_close(f"{vis} rows={rows} d{name}", g, w, 1e-12, 1e-12)


# ------------------------------------------------------------------ multi-process checks


def _full_layout(cp: int) -> SequenceLayout:
    c = 3
    T = 2 * cp * c
    # Row 0: a document ends exactly at a chunk end (pos 2) and one mid-chunk; row 1 one document
    # boundary inside chunk 1 and a long last document spanning several chunks.
    return SequenceLayout.from_tokens(packed_tokens(2, T, [[2, 7, T - 4], [5]]), 0)


def _check_recall(sp: Splitter, dtype: torch.dtype, rules: list[Visibility], rtol: float) -> None:
    B, H, T, D = 2, 2, sp.full_layout.total_length, 4
    gen = torch.Generator().manual_seed(1)
    for vis in rules:
        q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).to(dtype)
        want = memory.associative_recall(q, k, v, vis, sp.full_layout, sp.full_layout)
        want_grads = torch.autograd.grad((want * grad).sum(), (q, k, v))
        lq, lk, lv = sp.split(q), sp.split(k), sp.split(v)
        got = parallel.associative_recall(lq, lk, lv, vis, sp.layout, sp.layout)
        got.backward(sp.split(grad))
        assert_close(f"{vis} y", sp.gather(got), want, rtol, 1e-12)
        for name, g, w in zip("qkv", (lq.grad, lk.grad, lv.grad), want_grads):
            assert_close(f"{vis} d{name}", sp.gather(g), w, rtol, 1e-12)


def _check_recurrence(sp: Splitter, rtol: float) -> None:
    B, H, T, D = 2, 2, sp.full_layout.total_length, 3
    gen = torch.Generator().manual_seed(2)
    resets = sp.full_layout.resets
    # v2: per-token gates (gains up to e^6 between tokens: the log-space path matters), resets.
    x = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).requires_grad_()
    log_decay = (-torch.rand(B, H, T, 1, generator=gen, dtype=torch.float64)).requires_grad_()
    log_gain = (3 * torch.randn(B, H, T, 1, generator=gen, dtype=torch.float64)).requires_grad_()
    # v1: one decay per head (a parameter: its gradient is summed over ranks), no gain, no resets.
    theta = (-torch.rand(1, H, 1, 1, generator=gen, dtype=torch.float64)).requires_grad_()
    for label, gain, decay_full, use_resets in (("v2", log_gain, log_decay, True), ("v1", None, theta, False)):
        w_out = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
        w_scale = torch.randn(B, H, T, 1, generator=gen, dtype=torch.float64)
        r_full = resets if use_resets else None
        scaled, log_scale, _ = memory.linear_recurrence(x, decay_full, gain, r_full, None, chunk_size=2)
        # A loss on `scaled` (the model normalises it) and on h = scaled · exp(log_scale) itself
        # (log_scale is a reference point without a gradient of its own: h's is all in `scaled`).
        loss = (scaled * w_out).sum() + (scaled * torch.exp(log_scale) * w_scale).sum()
        inputs = [x, decay_full] + ([gain] if gain is not None else [])
        want_grads = torch.autograd.grad(loss, inputs)

        lx = sp.split(x)
        ldecay = sp.split(decay_full) if decay_full.shape[2] == T else decay_full.detach().clone().requires_grad_()
        lgain = None if gain is None else sp.split(gain)
        lres = None if r_full is None else sp.split(r_full, seq_dim=1)
        l_scaled, l_log, _ = parallel.linear_recurrence(lx, ldecay, lgain, lres, None, chunk_size=2)
        ((l_scaled * sp.split(w_out)).sum() + (l_scaled * torch.exp(l_log) * sp.split(w_scale)).sum()).backward()
        assert_close(f"{label} scaled", sp.gather(l_scaled), scaled, rtol, 1e-12)
        assert_close(f"{label} log_scale", sp.gather(l_log), log_scale, rtol, 1e-12)
        assert_close(f"{label} dx", sp.gather(lx.grad), want_grads[0], rtol, 1e-12)
        got_decay = sp.gather(ldecay.grad) if decay_full.shape[2] == T else sp.sum_shared(ldecay.grad)
        assert_close(f"{label} dlog_decay", got_decay, want_grads[1], rtol, 1e-12)
        if lgain is not None:
            assert_close(f"{label} dlog_gain", sp.gather(lgain.grad), want_grads[2], rtol, 1e-12)
        x.grad = None


def _check_peek(sp: Splitter, rtol: float) -> None:
    B, H, T, D = 2, 3, sp.full_layout.total_length, 2
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).requires_grad_()
    mix = torch.rand(1, H, 1, 1, generator=gen, dtype=torch.float64).requires_grad_()
    # The only document start at the first token of chunk 1 (another rank's): rank 0 holds no
    # start and passes resets=None, as the layers do, yet its chunk 0 must not peek across.
    c = sp.plan.chunk_size
    one_start = SequenceLayout.from_tokens(packed_tokens(B, T, [[c - 1], [c - 1]]), 0)
    cases = (("docs", sp.full_layout, False), ("no docs", None, False), ("start on other rank", one_start, True))
    for tag, layout, none_if_local_single in cases:
        grad = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
        resets = None if layout is None else layout.resets
        want = memory.peek_values(values, mix, resets)
        want_grads = torch.autograd.grad((want * grad).sum(), (values, mix))
        lv, lmix = sp.split(values), mix.detach().clone().requires_grad_()
        local = None if resets is None else sp.split(resets, seq_dim=1)
        if none_if_local_single and local is not None and not local[:, 1:].any() and sp.plan.cp_rank == 0:
            local = None
        got = parallel.peek_values(lv, lmix, local)
        got.backward(sp.split(grad))
        assert_close(f"peek {tag} y", sp.gather(got), want, rtol, 1e-12)
        assert_close(f"peek {tag} dvalues", sp.gather(lv.grad), want_grads[0], rtol, 1e-12)
        assert_close(f"peek {tag} dmix", sp.sum_shared(lmix.grad), want_grads[1], rtol, 1e-12)


def _v2_memory(ops, x: torch.Tensor, layout: SequenceLayout, p: dict, vis: Visibility) -> torch.Tensor:
    """One v2 memory end to end (gated keys, peeked values, adaptive β, recall) with ``ops``."""
    B, T, d = x.shape
    H = p["theta0"].shape[0]
    heads = lambda z: z.view(B, T, H, -1).transpose(1, 2)  # noqa: E731
    k_raw = heads(x @ p["w_key"].t())
    log_gain = (x @ p["w_gate"].t()).transpose(1, 2)[..., None]
    log_decay = -(x @ p["w_decay"].t()).abs().transpose(1, 2)[..., None]
    scaled, _, _ = ops.linear_recurrence(k_raw, log_decay, log_gain, layout.resets, None, 4)
    keys = scaled / (scaled.norm(dim=-1, keepdim=True) + 1e-6)
    v_raw = heads(x @ p["w_value"].t())
    mixed = ops.peek_values(v_raw, p["mix"].view(1, H, 1, 1), layout.resets)
    values = mixed / (mixed.norm(dim=-1, keepdim=True) + 1e-6) * torch.exp(p["value_scale"].abs()).view(1, H, 1, 1)
    beta = memory.adaptive_bandwidth(p["theta0"], p["theta1"], p["alpha"], vis.visible_counts(layout))
    return ops.associative_recall(keys * beta, keys, values, vis, layout, layout)


def _check_v2_memory(sp: Splitter, dtype: torch.dtype, rtol: float) -> None:
    B, T, d, H = 2, sp.full_layout.total_length, 8, 2
    gen = torch.Generator().manual_seed(4)
    shapes = {"w_key": (d, d), "w_gate": (H, d), "w_decay": (H, d), "w_value": (d, d), "mix": (H,),
              "value_scale": (H,), "theta0": (H,), "theta1": (H,), "alpha": (H,)}
    params = {n: (0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
              for n, s in shapes.items()}
    x = torch.randn(B, T, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    for vis in (Visibility(1, 5), Visibility(4)):
        grad = torch.randn(B, H, T, d // H, generator=gen, dtype=torch.float64).to(dtype)
        want = _v2_memory(memory, x, sp.full_layout, params, vis)
        want_grads = torch.autograd.grad((want * grad).sum(), [x, *params.values()])
        lx = sp.split(x, seq_dim=1)
        lparams = {n: t.detach().clone().requires_grad_() for n, t in params.items()}
        got = _v2_memory(parallel, lx, sp.layout, lparams, vis)
        got.backward(sp.split(grad))
        assert_close(f"v2 {vis} y", sp.gather(got), want, rtol, 1e-12)
        assert_close(f"v2 {vis} dx", sp.gather(lx.grad, seq_dim=1), want_grads[0], rtol, 1e-12)
        for (name, t), w in zip(lparams.items(), want_grads[1:]):
            assert_close(f"v2 {vis} d{name}", sp.sum_shared(t.grad), w, rtol, 1e-12)


def memory_checks() -> None:
    """Every primitive under the current Megatron CP group (called from the spawns in
    test_cp_model.py, which share their processes with the model checks)."""
    group = parallel_state.get_context_parallel_group()
    sp = Splitter(_full_layout(dist.get_world_size(group)), group)
    _check_recall(sp, torch.float64, RULES, 1e-10)
    _check_recall(sp, torch.float32, [Visibility(1), Visibility(1, 5)], 1e-5)
    # The scan computes in fp32 whatever the input dtype, and the two sides chunk differently
    # (the ends of a chunk level form one chunk when few): the v1 decay's gradient, a sum over
    # every position, differs by up to 2.7e-6 relative.
    _check_recurrence(sp, 5e-6)
    _check_peek(sp, 1e-12)
    _check_v2_memory(sp, torch.float64, 2e-6)
    _check_v2_memory(sp, torch.float32, 1e-5)
