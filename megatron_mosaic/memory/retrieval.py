"""Associative-memory retrieval: Gaussian kernel regression over visible pairs, via SDPA.

With unit-norm (or equal-norm) keys, softmax_i(-β‖k - k_i‖²) = softmax_i(β k·k_i): attention
with keys as queries, scale 1, and a visibility rule. Each rule is a causal attention over
shifted inputs (spec section 4), so torch's fused SDPA serves every memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .flex import flex_recall, flex_supported
from .layout import SequenceLayout
from .precision import fp32_region, upcast


@dataclass(frozen=True)
class Visibility:
    """Which stored pairs a query at global position t may read.

    Pair i is visible iff same document, i <= t - delay, and (window is None or i >= t - window + 1).
    v1 contextual memory: delay=1, window=None. v2 short-term: delay=1, window=h.
    v2 long-term: delay=m, window=None.
    """

    delay: int = 1
    window: int | None = None

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise ValueError(f"Visibility.delay must be >= 0, got {self.delay}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"Visibility.window must be None or >= 1, got {self.window}")

    def visible_counts(self, layout: SequenceLayout) -> Tensor:
        """n_t: (B, T) int64 number of visible pairs for each query (closed form).

        Counts pairs of the full sequence (global positions), not only those held locally.
        """
        t = layout.positions
        lower = layout.doc_starts
        if self.window is not None:
            lower = torch.maximum(lower, t - self.window + 1)
        return (t - self.delay - lower + 1).clamp(min=0)

    def mask(self, query_layout: SequenceLayout, key_layout: SequenceLayout) -> Tensor:
        """(B, 1, Tq, Tk) bool, True where the key is visible to the query."""
        tq = query_layout.positions[:, :, None]
        ti = key_layout.positions[:, None, :]
        visible = (query_layout.doc_starts[:, :, None] == key_layout.doc_starts[:, None, :]) & (ti <= tq - self.delay)
        if self.window is not None:
            visible = visible & (ti >= tq - self.window + 1)
        return visible[:, None]


def _is_consecutive_run(query_layout: SequenceLayout, key_layout: SequenceLayout) -> bool:
    """Queries and keys are the same consecutive positions (any number of documents).

    One layout object for both (the layers' case) answers from its cached Python facts; two
    objects are compared on the data (host syncs; decoding and tests only).
    """
    if not query_layout.consecutive:
        return False
    if key_layout is query_layout:
        return True
    qp, kp = query_layout.positions, key_layout.positions
    return qp.shape == kp.shape and bool(torch.equal(qp, kp) and torch.equal(query_layout.doc_starts,
                                                                              key_layout.doc_starts))


def _is_plain_shift(query_layout: SequenceLayout, key_layout: SequenceLayout) -> bool:
    """Queries and keys are the same consecutive run of one document: the shifted-SDPA case."""
    return _is_consecutive_run(query_layout, key_layout) and query_layout.uniform_documents


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


# Which kernel serves the rules that are not a plain shift (packed documents, context-parallel
# blocks, lse), per device type: "flex" (FlexAttention block masks, memory/flex.py) or "sdpa"
# (banded / masked SDPA). tools/bench_retrieval.py times both on a device and prints its pick.
# CPU: sdpa (FlexAttention has no CPU backward and runs eagerly at dense cost there).
# CUDA: flex, the only path without a (T, T) mask for packed documents; still to be confirmed by
# tools/gpu_check.py's retrieval benchmark on a GPU.
RECALL_BACKEND = {"cpu": "sdpa", "cuda": "flex"}


def _shifted_recall(q: Tensor, k: Tensor, v: Tensor, visibility: Visibility) -> Tensor:
    """One consecutive single-document run: causal SDPA of q[delay:] against k[:T-delay]."""
    B, H, T, _ = q.shape
    d, w = visibility.delay, visibility.window
    if d >= T or (w is not None and w <= d):  # every row empty
        return q.new_zeros(B, H, T, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())  # zero grads, not none
    L = T - d
    # Shifted row j (query t = j + d) sees shifted keys i in [j - W + 1, j], W = w - d: never empty.
    if w is not None and w - d < L and _band_plan(L, w - d)[0] > BANDED_MIN_BLOCKS:
        return _banded(q, k, v, d, w - d)
    if w is None and 2 * BANDED_MIN_ROWS <= L < CAUSAL_SPLIT_BELOW.get(q.device.type, 0):
        return _consecutive_recall(q, k, v, None, visibility, block_rows=-(-L // 2))
    qs, ks, vs = q[:, :, d:], k[:, :, :L], v[:, :, :L]
    if w is None or w - d >= L:
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=1.0)
    else:  # few blocks: one dense (L, L) band is cheaper
        j = torch.arange(L, device=q.device)
        band = (j[None, :] <= j[:, None]) & (j[None, :] > j[:, None] - (w - d))
        y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band, scale=1.0)
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


@functools.lru_cache(maxsize=32)
def _band_bias(nb: int, Bq: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``_band_mask`` as SDPA's additive mask (0 or -inf), (1, nb, Bq, 2Bq); it depends on the
    shape alone, so it is built once per shape (a float mask: SDPA converts a bool one on every
    call). Never an inference-mode tensor, which autograd could not save for a later backward."""
    with torch.inference_mode(False), torch.no_grad():
        mask = _band_mask(nb, Bq, width, device)
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))[None]


def _banded(q: Tensor, k: Tensor, v: Tensor, delay: int, width: int, starts: Tensor | None = None,
            min_block: int = BANDED_MIN_ROWS) -> Tensor:
    """Query t = j + delay reads keys [j - width + 1, j] (of its own document), in O(T·width).

    Shifted rows go in nb blocks of Bq >= width rows, so block n needs keys from blocks n-1 and
    n only: a 2·Bq window, two neighbouring blocks of the front-padded keys side by side (one cat,
    whose backward is two splits; an overlapping ``unfold`` window cost ~10 ms of
    ``unfold_backward`` per long-shape step on CPU). The blocks ride in SDPA's head dimension
    and heads in its batch, (B·H, nb, ·, ·): views, no transposed copies, and one band mask for
    every head. The shift and the block padding are one pad each (negative pads crop).

    q, k, v: (B, H, T, ·), one consecutive run; starts: (B, T) each token's document start as an
    index of the run (``_run_starts``; None: one document, where every row sees at least its own
    key). Rows with no visible key (a document's first tokens) get every key of their window and
    are zeroed afterwards, as in a masked recall; rows t < delay are zero.
    """
    B, H, T, D = q.shape
    L = T - delay
    nb, Bq = _band_plan(L, width, min_block)
    end = nb * Bq - L  # rows padded after the last block
    qb = F.pad(q, (0, 0, -delay, end)).view(B * H, nb, Bq, D)
    kb, vb = _windows(k, nb, Bq, end - delay), _windows(v, nb, Bq, end - delay)
    if starts is None:
        y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=_band_bias(nb, Bq, width, q.device, q.dtype),
                                           scale=1.0).view(B, H, nb * Bq, -1)
    else:
        # Key i (window column c of block n: i = (n-1)·Bq + c) is in row j's document iff i >=
        # the start of query t = j + delay's document; the band (cached) does the rest. Rows
        # whose key j is not in their document see nothing: they get the whole band (no NaN)
        # and are zeroed; so are the padding rows.
        row_start = F.pad(starts, (-delay, end)).view(B, nb, Bq, 1)
        j = torch.arange(nb * Bq, device=q.device).view(1, nb, Bq, 1)
        nonempty = (j >= row_start) & (j < L)
        floor = torch.where(nonempty, row_start, -Bq).unsqueeze(1)  # (B, 1, nb, Bq, 1)
        key_index = torch.arange(-Bq, nb * Bq, device=q.device).unfold(0, 2 * Bq, Bq).view(nb, 1, 2 * Bq)
        visible = (key_index >= floor).expand(B, H, nb, Bq, 2 * Bq)
        bias = torch.where(visible, _band_bias(nb, Bq, width, q.device, q.dtype)[0], float("-inf"))
        y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias.view(B * H, nb, Bq, 2 * Bq), scale=1.0)
        y = torch.where(nonempty.view(B, 1, nb * Bq, 1), y.view(B, H, nb * Bq, -1),
                        torch.zeros((), dtype=y.dtype, device=y.device))
    return F.pad(y, (0, 0, delay, -end))


def _banded_documents(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, visibility: Visibility,
                      min_block: int = BANDED_MIN_ROWS) -> Tensor | None:
    """A windowed rule over one consecutive run with document ``starts`` (B, T, as indices of the
    run), banded on the shifted rows (query t = j + delay sees keys j - W + 1 .. j, W = window -
    delay). Returns None when the band spans too few blocks to pay off (the caller takes the
    dense mask)."""
    T = q.shape[2]
    d, w = visibility.delay, visibility.window
    if w is None or d >= T or w <= d or _band_plan(T - d, w - d, min_block)[0] <= BANDED_MIN_BLOCKS:
        return None
    return _banded(q, k, v, d, w - d, starts, min_block)


def _run_starts(layout: SequenceLayout) -> Tensor:
    """(B, T) each token's document start as an index of its row's consecutive run (negative when
    the document began before the run, e.g. on an earlier context-parallel chunk)."""
    return layout.doc_starts - layout.positions[:, :1]


@functools.lru_cache(maxsize=64)
def _shift_band_bias(rows: int, keys: int, offset: int, width: int | None, device: torch.device,
                     dtype: torch.dtype) -> Tensor:
    """(rows, keys) additive mask of shifted row j = offset + a against key i = c: 0 where
    j - width < i <= j (no lower bound without a width), -inf elsewhere; built once per shape."""
    with torch.inference_mode(False), torch.no_grad():
        ahead = (offset + torch.arange(rows, device=device))[:, None] - torch.arange(keys, device=device)[None, :]
        band = ahead >= 0 if width is None else (ahead >= 0) & (ahead < width)
        return torch.zeros(rows, keys, dtype=dtype, device=device).masked_fill_(~band, float("-inf"))


# Rows per query block of _consecutive_recall: each block reads only the keys its rows can see, so
# nb blocks of a causal rule do (nb + 1) / (2 nb) of the dense work, at one SDPA call each (T =
# 2048, delay 128: 17 blocks, 0.53 of the masked (T, T) product; T = 256, delay 32: 2 blocks, 0.75).
CAUSAL_BLOCK_ROWS = 112

# Below this many keys, a causal SDPA call on the device computes the whole (L, L) square: CPU
# flash attention skips the keys a row cannot see only in blocks of 512. There one document's
# causal rule also goes in query blocks (two: 3/4 of the square).
CAUSAL_SPLIT_BELOW = {"cpu": 512}


def _consecutive_recall(q: Tensor, k: Tensor, v: Tensor, starts: Tensor | None, visibility: Visibility,
                        block_rows: int | None = None) -> Tensor | None:
    """Queries and keys the same consecutive run with document ``starts`` (B, T, as indices of the
    run; None: one document): shifted as in the plain path (query t = j + delay reads keys i <= j
    of its document, i > j - W under a window W = window - delay), in query blocks that each read,
    and mask, only the keys their rows can see: no (T, T) mask at once, about half of one in all.
    Returns None when every row is empty (the caller takes the masked path)."""
    T = q.shape[2]
    d, w = visibility.delay, visibility.window
    if d >= T or (w is not None and w <= d):
        return None
    L = T - d
    width = None if w is None else w - d
    nb = max(1, L // (block_rows or CAUSAL_BLOCK_ROWS))
    rows = -(-L // nb)
    if starts is not None:
        # row j's own key j is in its document iff j >= the start of query t = j + d's document;
        # rows without it see nothing: they get the band (never empty, no NaN) and are zeroed
        row_start = starts[:, d:]  # (B, L)
        nonempty = torch.arange(L, device=q.device) >= row_start
    ys = []
    for s in range(0, L, rows):
        e = min(s + rows, L)
        lo = 0 if width is None else max(0, s - width + 1)
        qb, kb, vb = q[:, :, d + s:d + e], k[:, :, lo:e], v[:, :, lo:e]
        if starts is None and s == lo:  # the top-left causal block: no mask to read
            ys.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=1.0))
            continue
        bias = _shift_band_bias(e - s, e - lo, s - lo, width, q.device, q.dtype)
        if starts is None:
            ys.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=1.0))
            continue
        floor = torch.where(nonempty[:, s:e], row_start[:, s:e], lo)[:, None, :, None]  # (B, 1, rows, 1)
        bias = torch.where(torch.arange(lo, e, device=q.device) >= floor, bias, float("-inf"))
        y = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bias, scale=1.0)
        ys.append(torch.where(nonempty[:, None, s:e, None], y, torch.zeros((), dtype=y.dtype, device=y.device)))
    y = ys[0] if nb == 1 else torch.cat(ys, dim=2)
    return F.pad(y, (0, 0, d, 0))


def _masked_recall(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, return_lse: bool):
    """Explicit-mask recall. mask (B,1,Tq,Tk). Empty rows: all keys allowed, output zeroed."""
    nonempty = mask.any(dim=-1, keepdim=True)  # (B,1,Tq,1)
    safe = mask | ~nonempty
    if not return_lse:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=1.0)
        return torch.where(nonempty, y, torch.zeros((), dtype=y.dtype, device=y.device))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    scores = scores.masked_fill(~safe, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # finite: every safe row has a key
    y = torch.matmul(torch.exp(scores - lse), v.float())
    y = torch.where(nonempty, y, torch.zeros((), dtype=y.dtype, device=y.device)).to(q.dtype)
    lse = torch.where(nonempty, lse, torch.full((), float("-inf"), device=lse.device)).squeeze(-1)
    return y, lse


def associative_recall(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    visibility: Visibility,
    query_layout: SequenceLayout | None = None,
    key_layout: SequenceLayout | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    fp32_scores: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """y_t = Σ_{i visible to t} softmax_i(q_t · k_i) v_i, with scale 1 (fold β into queries).

    queries: (B, H, Tq, D); keys, values: (B, H, Tk, D).
    Layouts None: both are the same contiguous single-document sequence (the fast shifted-SDPA
    path with no explicit mask where the rule allows it).
    Rows with nothing visible are exactly 0 (never NaN), gradients included.
    return_lse: also return the log-sum-exp of the visible scores, (B, H, Tq) fp32, -inf on
    empty rows, so partial results over key blocks can be merged (context parallelism).

    Layouts must be given both or neither. Given layouts that describe one consecutive run of a
    single document for both queries and keys also take the shifted fast path; a windowed rule
    over consecutive positions with several documents goes banded (no (Tq, Tk) mask) when the
    band spans more than BANDED_MIN_BLOCKS query blocks. return_lse uses an
    explicit fp32 (Tq, Tk) score block (meant for context-parallel blocks); the output keeps the
    queries' dtype.
    backend: "flex" or "sdpa" for every case but the plain shift (None: RECALL_BACKEND of the
    device, sdpa where FlexAttention cannot run the call, e.g. a CPU backward).
    fp32_scores: False leaves the kernels to autocast, as a transformer's attention (the GPT
    baseline's: scores scaled by 1/√d stay small); memories keep the default.
    """
    if queries.dim() != 4 or keys.dim() != 4 or values.dim() != 4:
        raise ValueError("associative_recall: queries, keys, values must be (B, H, T, D); got "
                         f"{tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    B, H, Tq, D = queries.shape
    Tk = keys.shape[2]
    if keys.shape[:2] != (B, H) or keys.shape[3] != D or values.shape[:3] != keys.shape[:3]:
        raise ValueError("associative_recall: shape mismatch: queries (B,H,Tq,D), keys (B,H,Tk,D), values "
                         f"(B,H,Tk,Dv) expected, got {tuple(queries.shape)}, {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}")
    if (query_layout is None) != (key_layout is None):
        raise ValueError("associative_recall: give both query_layout and key_layout, or neither")
    if query_layout is None:
        if Tq != Tk:
            raise ValueError(f"associative_recall: without layouts queries and keys are the same sequence, "
                             f"got Tq={Tq} != Tk={Tk}")
        plain = True
    else:
        if query_layout.positions.shape != (B, Tq) or key_layout.positions.shape != (B, Tk):
            raise ValueError(
                f"associative_recall: query_layout {tuple(query_layout.positions.shape)} / key_layout "
                f"{tuple(key_layout.positions.shape)} do not match (B, Tq)={(B, Tq)} / (B, Tk)={(B, Tk)}"
            )
        plain = _is_plain_shift(query_layout, key_layout)
    # Scores and softmax in fp32 whatever the autocast (memory/precision.py); the output goes
    # back to the queries' dtype, the lse stays fp32.
    flex = _use_flex(backend, queries, keys, values)
    if fp32_scores:
        with fp32_region(queries.device):
            result = _recall(upcast(queries), upcast(keys), upcast(values), visibility, query_layout, key_layout,
                             return_lse, plain, flex)
    else:
        result = _recall(queries, keys, values, visibility, query_layout, key_layout, return_lse, plain, flex)
    if return_lse:
        return result[0].to(queries.dtype), result[1]
    return result.to(queries.dtype)


def _use_flex(backend: str | None, *tensors: Tensor) -> bool:
    device = tensors[0].device
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    supported = flex_supported(device, needs_grad)
    if backend is None:
        return RECALL_BACKEND.get(device.type, "sdpa") == "flex" and supported
    if backend not in ("flex", "sdpa"):
        raise ValueError(f"associative_recall: backend must be 'flex', 'sdpa' or None, got {backend!r}")
    if backend == "flex" and not supported:
        raise ValueError(f"associative_recall: FlexAttention cannot run this call on {device.type} "
                         f"({'no backward there' if needs_grad else 'not importable'}); use backend='sdpa'")
    return backend == "flex"


def _recall(queries: Tensor, keys: Tensor, values: Tensor, visibility: Visibility,
            query_layout: SequenceLayout | None, key_layout: SequenceLayout | None, return_lse: bool,
            plain: bool, flex: bool) -> Tensor | tuple[Tensor, Tensor]:
    """associative_recall's path choice, on validated inputs."""
    B, H, Tq, _ = queries.shape
    Tk = keys.shape[2]
    if not return_lse and plain:
        return _shifted_recall(queries, keys, values, visibility)
    if Tk == 0:
        y = queries.new_zeros(B, H, Tq, values.shape[-1])
        lse = torch.full((B, H, Tq), float("-inf"), device=queries.device)
        return (y, lse) if return_lse else y
    if query_layout is None:
        query_layout = key_layout = SequenceLayout.contiguous(B, Tq, device=queries.device)
    if flex:  # every other rule: one block-sparse kernel, no (Tq, Tk) tensor
        return flex_recall(queries, keys, values, visibility.delay, visibility.window, query_layout, key_layout,
                           return_lse)
    if not return_lse and _is_consecutive_run(query_layout, key_layout):
        starts = _run_starts(query_layout)
        y = None if visibility.window is None else _banded_documents(queries, keys, values, starts, visibility)
        if y is None:
            y = _consecutive_recall(queries, keys, values, starts, visibility)
        if y is not None:
            return y
    mask = visibility.mask(query_layout, key_layout)
    return _masked_recall(queries, keys, values, mask, return_lse)


def merge_partial_recalls(
    outputs: list[Tensor], lses: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """Merge recalls over disjoint key blocks by the online-softmax rule (fp32).

    outputs[j]: (B, H, Tq, D), lses[j]: (B, H, Tq). Empty rows (all -inf) merge to exactly 0.
    Returns (output in outputs[0]'s dtype, lse fp32); merging merged results is associative.
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(f"merge_partial_recalls: need as many outputs as lses (>= 1), got {len(outputs)} "
                         f"and {len(lses)}")
    lse = torch.stack([l.float() for l in lses])  # (J,B,H,Tq)
    # The result is invariant to the reference point, so it carries no gradient.
    top = lse.amax(dim=0).detach()
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(lse - top)  # 0 for empty blocks
    total = weights.sum(dim=0)
    has_any = total > 0
    total_safe = torch.where(has_any, total, torch.ones_like(total))
    y = sum(w[..., None] * o.float() for w, o in zip(weights, outputs)) / total_safe[..., None]
    merged_lse = torch.where(has_any, top + torch.log(total_safe), torch.full_like(total, float("-inf")))
    return y.to(outputs[0].dtype), merged_lse
