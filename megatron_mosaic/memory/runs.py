"""Recall over one consecutive run of positions with torch's SDPA, without a (T, T) mask.

The shifted forms of spec section 4 on the SDPA kernels: query t = j + delay reads keys i <= j
(i > j - W under a window W = window - delay), of its own document when the run holds several.
Windows go banded (query blocks against their neighbouring key blocks), causal rules in query
blocks that read only the keys they can see; masks are additive, the constant ones cached per
shape. memory/retrieval.py decides which path serves a call; the float64 references decide
correctness (tests/memory/test_retrieval.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import SequenceLayout
from .masks import additive_mask, shape_constant


# A windowed rule goes banded (blocks of >= max(window, BANDED_MIN_ROWS) queries, each against a
# window of twice its rows) only when the band spans more than this many query blocks: the blocks
# then do under 2/3 of the dense work. At 3 blocks or fewer one dense (T, T) band mask is as fast
# on CPU, at 4 (the quickstart's window 64, T = 256) banded is ~1/3 faster (tools/bench_layers.py).
BANDED_MIN_BLOCKS = 3
BANDED_MIN_ROWS = 32


def _band_plan(length: int, width: int, min_block: int = BANDED_MIN_ROWS) -> tuple[int, int]:
    """(nb, Bq): as many query blocks as hold at least max(width, min_block) rows each, all of
    Bq = ceil(length / nb) rows, so the end pads fewer than nb rows (2047 rows, width 255: 8 × 256)."""
    nb = max(1, length // max(width, min_block, 1))
    return nb, -(-length // nb)


def shifted_recall(q: Tensor, k: Tensor, v: Tensor, delay: int, window: int | None) -> Tensor:
    """One consecutive single-document run: query t reads keys (t - window, t - delay] (no
    lower bound without a window), causal SDPA of q[delay:] against k[:T-delay]."""
    B, H, T, _ = q.shape
    d, w = delay, window
    if d >= T or (w is not None and w <= d):  # every row empty
        return q.new_zeros(B, H, T, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())  # zero grads, not none
    L = T - d
    # Shifted row j (query t = j + d) sees shifted keys i in [j - W + 1, j], W = w - d: never empty.
    if w is not None and w - d < L and _band_plan(L, w - d)[0] > BANDED_MIN_BLOCKS:
        return _banded(q, k, v, d, w - d)
    if w is None and 2 * BANDED_MIN_ROWS <= L < CAUSAL_SPLIT_BELOW.get(q.device.type, 0):
        return consecutive_recall(q, k, v, None, d, w, block_rows=-(-L // 2))
    qs, ks, vs = q[:, :, d:], k[:, :, :L], v[:, :, :L]
    if w is None or w - d >= L:
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=1.0)
    else:  # few blocks: one dense (L, L) band is cheaper
        y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_shift_band_bias(L, L, 0, w - d, q.device, q.dtype),
                                           scale=1.0)
    return F.pad(y, (0, 0, d, 0))  # rows t < delay see nothing: one pad, not zeros + cat


def _windows(x: Tensor, nb: int, Bq: int, end: int) -> Tensor:
    """(B, H, T, D) -> (B·H, nb, 2·Bq, D): block n holds positions [(n-1)·Bq, (n+1)·Bq) of x
    padded by Bq rows in front and ``end`` at the back (negative: cropped)."""
    B, H, _, D = x.shape
    x = F.pad(x, (0, 0, Bq, end)).view(B, H, nb + 1, Bq, D)
    # two neighbouring blocks side by side; split, whose backward is one cat (a slice's would
    # zero-fill and copy the whole tensor)
    x = torch.cat([x.split([nb, 1], dim=2)[0], x.split([1, nb], dim=2)[1]], dim=3)
    return x.view(B * H, nb, 2 * Bq, D)


def _band_mask(nb: int, Bq: int, width: int, device: torch.device) -> Tensor:
    """(nb, Bq, 2Bq) bool: query a of block n (shifted row j = n·Bq + a) sees window column c
    (key i = (n-1)·Bq + c) iff i in [j - width + 1, j]; block 0's first Bq columns are padding."""
    a = torch.arange(Bq, device=device)[:, None]
    c = torch.arange(2 * Bq, device=device)[None, :]
    band = (c > a + Bq - width) & (c <= a + Bq)
    return torch.cat([(band & (c >= Bq))[None], band.expand(nb - 1, Bq, 2 * Bq)])


@shape_constant(maxsize=32)
def _band_bias(nb: int, Bq: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``_band_mask`` as SDPA's additive mask, (1, nb, Bq, 2Bq)."""
    return additive_mask(_band_mask(nb, Bq, width, device), dtype)[None]


def _banded(q: Tensor, k: Tensor, v: Tensor, delay: int, width: int, documents: SequenceLayout | None = None,
            min_block: int = BANDED_MIN_ROWS) -> Tensor:
    """Query t = j + delay reads keys [j - width + 1, j] (of its own document), in O(T·width).

    Shifted rows go in nb blocks of Bq >= width rows, so block n needs keys from blocks n-1 and
    n only: a 2·Bq window, two neighbouring blocks of the front-padded keys side by side (one cat,
    whose backward is two splits; an overlapping ``unfold`` window cost ~10 ms of
    ``unfold_backward`` per long-shape step on CPU). The blocks ride in SDPA's head dimension
    and heads in its batch, (B·H, nb, ·, ·): views, no transposed copies, and one band mask for
    every head. The shift and the block padding are one pad each (negative pads crop).

    q, k, v: (B, H, T, ·), one consecutive run; documents: its layout when it holds several
    documents (None: one, where every row sees at least its own key). Rows with no visible key
    (a document's first tokens) get every key of their window and are zeroed afterwards, as in
    a masked recall; rows t < delay are zero.
    """
    B, H, T, D = q.shape
    L = T - delay
    nb, Bq = _band_plan(L, width, min_block)
    end = nb * Bq - L  # rows padded after the last block
    qb = F.pad(q, (0, 0, -delay, end)).view(B * H, nb, Bq, D)
    kb, vb = _windows(k, nb, Bq, end - delay), _windows(v, nb, Bq, end - delay)
    if documents is None:
        y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=_band_bias(nb, Bq, width, q.device, q.dtype),
                                           scale=1.0).view(B, H, nb * Bq, -1)
    else:
        bias, nonempty = documents.derived(("banded", delay, width, nb, Bq, H, q.dtype), lambda: _banded_masks(
            run_starts(documents), delay, width, nb, Bq, H, q.dtype))
        y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=1.0)
        y = torch.where(nonempty, y.view(B, H, nb * Bq, -1), torch.zeros((), dtype=y.dtype, device=y.device))
    return F.pad(y, (0, 0, delay, -end))


def _banded_masks(starts: Tensor, delay: int, width: int, nb: int, Bq: int, heads: int,
                  dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``_banded``'s masks for document ``starts`` (B, T): the additive band-and-document mask
    (B·heads, nb, Bq, 2Bq) and the rows that see a key, (B, 1, nb·Bq, 1).

    Key i (window column c of block n: i = (n-1)·Bq + c) is in row j's document iff i >= the
    start of query t = j + delay's document; the band (cached) does the rest. Rows whose key j
    is not in their document see nothing: they get the whole band (no NaN) and are zeroed; so
    are the padding rows."""
    B, T = starts.shape
    L, device = T - delay, starts.device
    row_start = F.pad(starts, (-delay, nb * Bq - L)).view(B, nb, Bq, 1)
    j = torch.arange(nb * Bq, device=device).view(1, nb, Bq, 1)
    nonempty = (j >= row_start) & (j < L)
    floor = torch.where(nonempty, row_start, -Bq).unsqueeze(1)  # (B, 1, nb, Bq, 1)
    key_index = torch.arange(-Bq, nb * Bq, device=device).unfold(0, 2 * Bq, Bq).view(nb, 1, 2 * Bq)
    visible = (key_index >= floor).expand(B, heads, nb, Bq, 2 * Bq)
    bias = torch.where(visible, _band_bias(nb, Bq, width, device, dtype)[0], float("-inf"))
    return bias.view(B * heads, nb, Bq, 2 * Bq), nonempty.view(B, 1, nb * Bq, 1)


def banded_documents(q: Tensor, k: Tensor, v: Tensor, documents: SequenceLayout, delay: int, window: int | None,
                     min_block: int = BANDED_MIN_ROWS) -> Tensor | None:
    """A windowed rule over one consecutive run with several ``documents`` (its layout), banded
    on the shifted rows (query t = j + delay sees keys j - W + 1 .. j, W = window - delay).
    Returns None when the band spans too few blocks to pay off (the caller takes the dense
    mask)."""
    T = q.shape[2]
    d, w = delay, window
    if w is None or d >= T or w <= d or _band_plan(T - d, w - d, min_block)[0] <= BANDED_MIN_BLOCKS:
        return None
    return _banded(q, k, v, d, w - d, documents, min_block)


def run_starts(layout: SequenceLayout) -> Tensor:
    """(B, T) each token's document start as an index of its row's consecutive run (negative when
    the document began before the run, e.g. on an earlier context-parallel chunk); once per layout."""
    return layout.derived(("run_starts",), lambda: layout.doc_starts - layout.positions[:, :1])


@shape_constant(maxsize=64)
def _shift_band_bias(rows: int, keys: int, offset: int, width: int | None, device: torch.device,
                     dtype: torch.dtype) -> Tensor:
    """(rows, keys) additive mask of shifted row j = offset + a against key i = c: 0 where
    j - width < i <= j (no lower bound without a width), -inf elsewhere."""
    ahead = (offset + torch.arange(rows, device=device))[:, None] - torch.arange(keys, device=device)[None, :]
    return additive_mask(ahead >= 0 if width is None else (ahead >= 0) & (ahead < width), dtype)


# Rows per query block of consecutive_recall: each block reads only the keys its rows can see, so
# nb blocks of a causal rule do (nb + 1) / (2 nb) of the dense work, at one SDPA call each (T =
# 2048, delay 128: 17 blocks, 0.53 of the masked (T, T) product; T = 256, delay 32: 2 blocks, 0.75).
CAUSAL_BLOCK_ROWS = 112

# Below this many keys, a causal SDPA call on the device computes the whole (L, L) square: CPU
# flash attention skips the keys a row cannot see only in blocks of 512. There one document's
# causal rule also goes in query blocks (two: 3/4 of the square).
CAUSAL_SPLIT_BELOW = {"cpu": 512}


def _query_blocks(L: int, rows: int, width: int | None):
    """consecutive_recall's query blocks: (s, e, lo), shifted rows [s, e) and the first key lo
    any of them can see."""
    for s in range(0, L, rows):
        yield s, min(s + rows, L), 0 if width is None else max(0, s - width + 1)


def _document_block_masks(starts: Tensor, delay: int, width: int | None, rows: int,
                          dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """Per query block of consecutive_recall over document ``starts`` (B, T): its additive mask
    (B, 1, rows, keys) and its rows that see a key, (B, 1, rows, 1). Row j's own key j is in its
    document iff j >= the start of query t = j + delay's document; rows without it see nothing:
    they get the band (never empty, no NaN) and are zeroed."""
    L, device = starts.shape[1] - delay, starts.device
    row_start = starts[:, delay:]  # (B, L)
    nonempty = torch.arange(L, device=device) >= row_start
    masks = []
    for s, e, lo in _query_blocks(L, rows, width):
        floor = torch.where(nonempty[:, s:e], row_start[:, s:e], lo)[:, None, :, None]  # (B, 1, rows, 1)
        bias = torch.where(torch.arange(lo, e, device=device) >= floor,
                           _shift_band_bias(e - s, e - lo, s - lo, width, device, dtype), float("-inf"))
        masks.append((bias, nonempty[:, None, s:e, None]))
    return masks


def consecutive_recall(q: Tensor, k: Tensor, v: Tensor, documents: SequenceLayout | None, delay: int,
                       window: int | None, block_rows: int | None = None) -> Tensor | None:
    """Queries and keys the same consecutive run, whose layout ``documents`` holds several
    documents (None: one): shifted as in the plain path (query t = j + delay reads keys i <= j
    of its document, i > j - W under a window W = window - delay), in query blocks that each
    read, and mask, only the keys their rows can see: no (T, T) mask at once, about half of one
    in all; the document masks are built once per layout. Returns None when every row is empty
    (the caller takes the masked path)."""
    T = q.shape[2]
    d, w = delay, window
    if d >= T or (w is not None and w <= d):
        return None
    L = T - d
    width = None if w is None else w - d
    nb = max(1, L // (block_rows or CAUSAL_BLOCK_ROWS))
    rows = -(-L // nb)
    if documents is not None:
        masks = documents.derived(("consecutive", d, width, rows, q.dtype),
                                  lambda: _document_block_masks(run_starts(documents), d, width, rows, q.dtype))
    ys = []
    for n, (s, e, lo) in enumerate(_query_blocks(L, rows, width)):
        qb, kb, vb = q[:, :, d + s:d + e], k[:, :, lo:e], v[:, :, lo:e]
        if documents is None:
            if width is None and s == 0:  # the top-left causal block: no mask to read
                ys.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=1.0))
            else:
                bias = _shift_band_bias(e - s, e - lo, s - lo, width, q.device, q.dtype)
                ys.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=1.0))
            continue
        bias, nonempty = masks[n]
        y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=1.0)
        ys.append(torch.where(nonempty, y, torch.zeros((), dtype=y.dtype, device=y.device)))
    y = ys[0] if nb == 1 else torch.cat(ys, dim=2)
    return F.pad(y, (0, 0, d, 0))
