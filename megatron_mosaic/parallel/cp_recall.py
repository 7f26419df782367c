"""Ring retrieval: associative recall with the stored pairs sharded over CP ranks.

Each rank keeps its queries (two load-balanced chunks). At ring step s it receives from rank
r−s exactly the key/value rows its queries can see and sends rank r+s the rows that rank can
see, while it computes on the rows of step s−1; partial recalls merge by the online-softmax
(log-sum-exp) rule in fp32. Which rows are needed is a pure function of global positions and
the visibility rule, known on every rank without communication, so a block the rule makes
empty is neither sent nor computed: the short-term window (delay 1, window h) only moves a halo
of h−1 rows from the two neighbouring chunks, the long-term memory (delay m) skips chunks
closer than m. Document starts prune further on the receiving side (query rows only see keys at
or after their document start).

The block math is flash-attention style in plain torch: queries in row tiles, scores for one
tile × one contiguous key range at a time (never a T×T matrix), fp32 softmax statistics, and a
backward that recomputes the scores. The backward is a ring too: (k, v) rows travel the same way
again, dq stays local, dk/dv go back to the rows' owners.
"""

from __future__ import annotations

from collections.abc import Iterator

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..memory.layout import SequenceLayout
from ..memory.precision import fp32_region
from ..memory.retrieval import Visibility
from .comm import PeerExchange
from .context_parallel import ChunkPlan

# Budget for one score tile (elements of B·H·rows·keys); bounds peak memory independently of T.
DEFAULT_MAX_TILE_ELEMENTS = 1 << 21

_TAG_K, _TAG_V, _TAG_DK, _TAG_DV = 11, 12, 13, 14


# ---------------------------------------------------------------------------------------------
# Schedule: which key rows each rank needs, from global positions only.
# ---------------------------------------------------------------------------------------------


def _check_visibility(visibility: Visibility) -> None:
    if visibility.delay < 0:
        raise ValueError(f"Visibility.delay must be >= 0, got {visibility.delay}")
    if visibility.window is not None and visibility.window < 1:
        raise ValueError(f"Visibility.window must be >= 1 or None, got {visibility.window}")


def needed_key_range(plan: ChunkPlan, visibility: Visibility, receiver: int, key_chunk: int) -> tuple[int, int] | None:
    """Half-open global range [lo, hi) of ``key_chunk`` that some query of ``receiver`` may see.

    Position rule only (pair i visible to t iff t − window < i <= t − delay); document starts
    can only shrink it. The hull over the receiver's two chunks: with a window alone the needed
    rows are a suffix, with a delay alone a prefix, so the hull is exact in both cases.
    """
    c = plan.chunk_size
    k_lo, k_hi = key_chunk * c, key_chunk * c + c - 1
    lo, hi = None, None
    for q_chunk in plan.chunks_of(receiver):
        first, last = q_chunk * c, q_chunk * c + c - 1
        low = k_lo if visibility.window is None else max(k_lo, first - visibility.window + 1)
        high = min(k_hi, last - visibility.delay)
        if high >= low:
            lo = low if lo is None else min(lo, low)
            hi = high if hi is None else max(hi, high)
    return None if lo is None else (lo, hi + 1)


@dataclass(frozen=True)
class Segment:
    """A contiguous run of key rows: global ``start``, ``length``, first row in its tensor."""

    start: int
    length: int
    row: int


def message_segments(plan: ChunkPlan, visibility: Visibility, sender: int, receiver: int) -> list[tuple[Segment, Segment]]:
    """Rows ``sender`` ships to ``receiver``: (segment in sender's local tensor, in the message)."""
    c = plan.chunk_size
    out, offset = [], 0
    for slot, chunk in enumerate(plan.chunks_of(sender)):
        rng = needed_key_range(plan, visibility, receiver, chunk)
        if rng is None:
            continue
        lo, hi = rng
        local = Segment(lo, hi - lo, slot * c + lo - chunk * c)
        out.append((local, Segment(lo, hi - lo, offset)))
        offset += hi - lo
    return out


# ---------------------------------------------------------------------------------------------
# Block math: one query tile against one contiguous key segment.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryTile:
    """Local rows [row0, row1) at global positions pos0.., document starts within [doc_min, doc_max]."""

    row0: int
    row1: int
    pos0: int
    doc_min: int
    doc_max: int


def make_query_tiles(plan: ChunkPlan, doc_starts: Tensor, rows: int) -> list[QueryTile]:
    """Tiles of at most ``rows`` query rows that never straddle the two local chunks."""
    c = plan.chunk_size
    bounds = []
    for slot, chunk in enumerate(plan.chunks):
        for start in range(0, c, rows):
            bounds.append((slot * c + start, slot * c + min(start + rows, c), chunk * c + start))
    if not bounds:
        return []
    # One host transfer for all tiles' document-start bounds.
    mins = torch.stack([doc_starts[:, a:b].min() for a, b, _ in bounds]).tolist()
    maxs = torch.stack([doc_starts[:, a:b].max() for a, b, _ in bounds]).tolist()
    return [QueryTile(a, b, p, int(lo), int(hi)) for (a, b, p), lo, hi in zip(bounds, mins, maxs)]


def _tile_key_range(tile: QueryTile, seg: Segment, visibility: Visibility) -> tuple[int, int, bool] | None:
    """Global [lo, hi] keys of ``seg`` the tile may see, and whether all of them are visible to all rows."""
    n = tile.row1 - tile.row0
    first, last = tile.pos0, tile.pos0 + n - 1
    lo = max(seg.start, tile.doc_min)
    if visibility.window is not None:
        lo = max(lo, first - visibility.window + 1)
    hi = min(seg.start + seg.length - 1, last - visibility.delay)
    if hi < lo:
        return None
    full = hi <= first - visibility.delay and lo >= tile.doc_max
    if visibility.window is not None:
        full = full and lo >= last - visibility.window + 1
    return lo, hi, full


def _tile_mask(tile: QueryTile, lo: int, hi: int, doc_starts: Tensor, visibility: Visibility) -> Tensor:
    """(B, 1, n, m) bool visibility of keys lo..hi to the tile's rows."""
    device = doc_starts.device
    q_pos = torch.arange(tile.pos0, tile.pos0 + tile.row1 - tile.row0, device=device)[:, None]
    k_pos = torch.arange(lo, hi + 1, device=device)[None, :]
    mask = k_pos <= q_pos - visibility.delay
    if visibility.window is not None:
        mask = mask & (k_pos > q_pos - visibility.window)
    same_doc = k_pos[None] >= doc_starts[:, tile.row0 : tile.row1, None]
    return (mask[None] & same_doc)[:, None]


def _scores(q_tile: Tensor, keys: Tensor, mask: Tensor | None) -> Tensor:
    scores = torch.matmul(q_tile, keys.transpose(-1, -2))
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores


def _safe(lse: Tensor) -> Tensor:
    """-inf (empty row) -> 0 so exp(x - lse) stays 0 instead of NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _visible_blocks(tile: QueryTile, segments: list[Segment], doc_starts: Tensor,
                    visibility: Visibility) -> Iterator[tuple[int, int, Tensor | None]]:
    """The key blocks a query tile can see: (first row, end row) in the received rows and the
    tile's mask over them (None when every pair is visible). Shared by forward and backward so
    both walk exactly the same blocks."""
    for seg in segments:
        rng = _tile_key_range(tile, seg, visibility)
        if rng is None:
            continue
        lo, hi, full = rng
        a, b = seg.row + lo - seg.start, seg.row + hi + 1 - seg.start
        yield a, b, (None if full else _tile_mask(tile, lo, hi, doc_starts, visibility))


def forward_segments(
    q: Tensor, rows_k: Tensor, rows_v: Tensor, segments: list[Segment], tiles: list[QueryTile],
    doc_starts: Tensor, visibility: Visibility, out: Tensor, lse: Tensor,
) -> None:
    """Merge the recall of every tile over ``segments`` into (out, lse) in place (out's dtype)."""
    dt = out.dtype
    for tile in tiles:
        q_tile = q[:, :, tile.row0 : tile.row1].to(dt)
        for a, b, mask in _visible_blocks(tile, segments, doc_starts, visibility):
            scores = _scores(q_tile, rows_k[:, :, a:b].to(dt), mask)
            # One exp pass, in place: p = exp(s - rowmax); empty rows (max -inf) give p = 0.
            row_max = _safe(scores.amax(dim=-1))
            probs = scores.sub_(row_max[..., None]).exp_()
            total = probs.sum(dim=-1)
            empty = total == 0
            block_out = torch.matmul(probs, rows_v[:, :, a:b].to(dt)) / torch.where(empty, 1.0, total)[..., None]
            block_lse = torch.where(empty, float("-inf"), row_max + torch.log(total))
            old_lse = lse[:, :, tile.row0 : tile.row1]
            new_lse = torch.logaddexp(old_lse, block_lse)
            safe_new = _safe(new_lse)
            w_old = torch.exp(old_lse - safe_new)[..., None]
            w_new = torch.exp(block_lse - safe_new)[..., None]
            view = out[:, :, tile.row0 : tile.row1]
            view.mul_(w_old).add_(block_out * w_new)
            old_lse.copy_(new_lse)


def backward_segments(
    q: Tensor, rows_k: Tensor, rows_v: Tensor, segments: list[Segment], tiles: list[QueryTile],
    doc_starts: Tensor, visibility: Visibility, lse: Tensor, grad_out: Tensor, delta: Tensor,
    grad_q: Tensor, grad_k: Tensor, grad_v: Tensor,
) -> None:
    """Accumulate dq (local rows) and dk, dv (rows of ``rows_k``/``rows_v``) in place (grad_q's dtype).

    lse: final (B, H, Tq) log-sum-exp; delta = Σ_d dO·O per query row (B, H, Tq).
    """
    dt = grad_q.dtype
    for tile in tiles:
        r0, r1 = tile.row0, tile.row1
        q_tile = q[:, :, r0:r1].to(dt)
        go = grad_out[:, :, r0:r1]
        lse_tile = _safe(lse[:, :, r0:r1])[..., None]
        delta_tile = delta[:, :, r0:r1, None]
        for a, b, mask in _visible_blocks(tile, segments, doc_starts, visibility):
            keys, vals = rows_k[:, :, a:b].to(dt), rows_v[:, :, a:b].to(dt)
            probs = _scores(q_tile, keys, mask).sub_(lse_tile).exp_()
            grad_v[:, :, a:b] += torch.matmul(probs.transpose(-1, -2), go)
            grad_scores = probs * (torch.matmul(go, vals.transpose(-1, -2)) - delta_tile)
            grad_q[:, :, r0:r1] += torch.matmul(grad_scores, keys)
            grad_k[:, :, a:b] += torch.matmul(grad_scores.transpose(-1, -2), q_tile)


# ---------------------------------------------------------------------------------------------
# The ring.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ring:
    plan: ChunkPlan
    visibility: Visibility
    exchange: PeerExchange | None

    def src(self, step: int) -> int:
        return (self.plan.cp_rank - step) % self.plan.cp_size

    def dst(self, step: int) -> int:
        return (self.plan.cp_rank + step) % self.plan.cp_size

    def incoming(self, step: int) -> list[tuple[Segment, Segment]]:
        return message_segments(self.plan, self.visibility, self.src(step), self.plan.cp_rank)

    def outgoing(self, step: int) -> list[tuple[Segment, Segment]]:
        return message_segments(self.plan, self.visibility, self.plan.cp_rank, self.dst(step))

    def _post_pair(self, to: int, send_k: Tensor, send_v: Tensor, frm: int, n_in: int, like_k: Tensor,
                   like_v: Tensor, dtype: torch.dtype, tags: tuple[int, int]):
        """k and v as two tagged batches (gloo pairs sends and receives by peer and tag)."""
        assert self.exchange is not None
        B, H = like_k.shape[:2]
        pk = self.exchange.post([(to, send_k)], [(frm, "k", (B, H, n_in, like_k.shape[-1]), dtype)], like_k.device, tags[0])
        pv = self.exchange.post([(to, send_v)], [(frm, "v", (B, H, n_in, like_v.shape[-1]), dtype)], like_v.device, tags[1])
        return pk, pv

    def post_rows(self, step: int, k: Tensor, v: Tensor):
        """Send my rows rank dst(step) needs; receive the rows I need from src(step)."""
        out_k, out_v = _pack(k, v, self.outgoing(step))
        n_in = sum(msg.length for _, msg in self.incoming(step))
        return self._post_pair(self.dst(step), out_k, out_v, self.src(step), n_in, k, v, k.dtype, (_TAG_K, _TAG_V))

    def post_grads(self, step: int, grad_k: Tensor, grad_v: Tensor):
        """Send dk/dv of the rows borrowed at ``step`` home; receive those of my rows from dst(step)."""
        n_back = sum(msg.length for _, msg in self.outgoing(step))
        return self._post_pair(self.src(step), grad_k, grad_v, self.dst(step), n_back, grad_k, grad_v,
                               grad_k.dtype, (_TAG_DK, _TAG_DV))

    def active_steps(self) -> list[int]:
        """Steps s >= 1 with anything to send or receive (identical schedule on every rank)."""
        return [s for s in range(1, self.plan.cp_size) if self.incoming(s) or self.outgoing(s)]


def _accumulate_returned(ring: "_Ring", step: int, pending, grad_k: Tensor, grad_v: Tensor) -> None:
    """Add the dk/dv that rank dst(step) computed for the rows I sent it at ``step``."""
    back_k, back_v = _wait(pending)
    for loc, msg in ring.outgoing(step):
        grad_k[:, :, loc.row : loc.row + loc.length] += back_k[:, :, msg.row : msg.row + msg.length]
        grad_v[:, :, loc.row : loc.row + loc.length] += back_v[:, :, msg.row : msg.row + msg.length]


def _pack(k: Tensor, v: Tensor, segments: list[tuple[Segment, Segment]]) -> tuple[Tensor, Tensor]:
    if not segments:
        return k[:, :, :0], v[:, :, :0]
    ks = [k[:, :, loc.row : loc.row + loc.length] for loc, _ in segments]
    vs = [v[:, :, loc.row : loc.row + loc.length] for loc, _ in segments]
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def _wait(pair) -> tuple[Tensor, Tensor]:
    pk, pv = pair
    return pk.wait()["k"], pv.wait()["v"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 softmax statistics and accumulators (fp64 kept for fp64 inputs, e.g. tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _RingRecall(torch.autograd.Function):
    # Scores and softmax in fp32 under autocast too (memory/precision.py): both passes run in an
    # fp32 region, whatever autocast state the caller's forward or backward is in.
    @staticmethod
    def forward(ctx, q, k, v, doc_starts, ring: _Ring, tiles: list[QueryTile]):  # type: ignore[override]
        with fp32_region(q.device):
            return _RingRecall._forward(ctx, q, k, v, doc_starts, ring, tiles)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        with fp32_region(grad_out.device):
            return _RingRecall._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, q, k, v, doc_starts, ring: _Ring, tiles: list[QueryTile]):
        B, H, T, _ = q.shape
        dt = _compute_dtype(q)
        out = torch.zeros(B, H, T, v.shape[-1], dtype=dt, device=q.device)
        lse = torch.full((B, H, T), float("-inf"), dtype=dt, device=q.device)
        steps = ring.active_steps()
        pending = ring.post_rows(steps[0], k, v) if steps else None
        local = [seg for seg, _ in ring.incoming(0)]
        forward_segments(q, k, v, local, tiles, doc_starts, ring.visibility, out, lse)
        for i, step in enumerate(steps):
            rows_k, rows_v = _wait(pending)
            # Launch the next transfer before computing on this one: comm overlaps compute.
            pending = ring.post_rows(steps[i + 1], k, v) if i + 1 < len(steps) else None
            segs = [msg for _, msg in ring.incoming(step)]
            forward_segments(q, rows_k, rows_v, segs, tiles, doc_starts, ring.visibility, out, lse)
        ctx.save_for_backward(q, k, v, doc_starts, out, lse)
        ctx.ring, ctx.tiles, ctx.steps = ring, tiles, steps
        return out.to(v.dtype)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, doc_starts, out, lse = ctx.saved_tensors
        ring, tiles, steps = ctx.ring, ctx.tiles, ctx.steps
        dt = out.dtype
        grad_out = grad_out.to(dt)
        delta = (grad_out * out).sum(-1)
        grad_q = torch.zeros_like(q, dtype=dt)
        grad_k = torch.zeros_like(k, dtype=dt)
        grad_v = torch.zeros_like(v, dtype=dt)
        args = (tiles, doc_starts, ring.visibility, lse, grad_out, delta)

        pending = ring.post_rows(steps[0], k, v) if steps else None
        local = [seg for seg, _ in ring.incoming(0)]
        backward_segments(q, k, v, local, *args, grad_q, grad_k, grad_v)
        in_flight = None  # dk/dv of the previous step: waited one step later, so at most two
        for i, step in enumerate(steps):  # blocks of returning gradients are alive at once
            rows_k, rows_v = _wait(pending)
            pending = ring.post_rows(steps[i + 1], k, v) if i + 1 < len(steps) else None
            segs = [msg for _, msg in ring.incoming(step)]
            gk = torch.zeros_like(rows_k, dtype=dt)
            gv = torch.zeros_like(rows_v, dtype=dt)
            backward_segments(q, rows_k, rows_v, segs, *args, grad_q, gk, gv)
            # dk/dv of the borrowed rows go home to src(step); mine come back from dst(step).
            posted = (step, ring.post_grads(step, gk, gv))
            if in_flight is not None:
                _accumulate_returned(ring, *in_flight, grad_k, grad_v)
            in_flight = posted
        if in_flight is not None:
            _accumulate_returned(ring, *in_flight, grad_k, grad_v)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def default_tile_rows(plan: ChunkPlan, batch: int, heads: int, max_tile_elements: int) -> int:
    """Query rows per tile so one score tile against a whole chunk stays within the budget."""
    rows = max_tile_elements // max(1, batch * heads * plan.chunk_size)
    return max(1, min(plan.chunk_size, rows))


def ring_associative_recall(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    visibility: Visibility,
    layout: SequenceLayout,
    group: dist.ProcessGroup | None,
    tile_rows: int | None = None,
    max_tile_elements: int = DEFAULT_MAX_TILE_ELEMENTS,
) -> Tensor:
    """Context-parallel ``associative_recall``: y_t = Σ_{i visible to t} softmax_i(q_t·k_i) v_i.

    queries, keys: (B, H, 2c, D); values: (B, H, 2c, Dv) — this rank's two load-balanced chunks.
    layout: this rank's layout (B, 2c), positions global (from ``split_for_context_parallel``);
            keys are the same tokens as the queries.
    group:  the CP group (None: one rank, the whole sequence is local).
    tile_rows: query rows per score tile (None: from ``max_tile_elements``).
    Returns (B, H, 2c, Dv) in the values' dtype; rows with nothing visible are exactly 0.
    """
    _check_visibility(visibility)
    cp_size = 1 if group is None else dist.get_world_size(group)
    cp_rank = 0 if group is None else dist.get_rank(group)
    B, H, T_local, _ = queries.shape
    if keys.shape[:3] != (B, H, T_local) or values.shape[:3] != (B, H, T_local):
        raise ValueError(
            f"ring_associative_recall: queries {tuple(queries.shape)}, keys {tuple(keys.shape)} and "
            f"values {tuple(values.shape)} must share (B, H, T_local)"
        )
    plan = ChunkPlan(layout.total_length, cp_size, cp_rank)
    if T_local != plan.local_length:
        raise ValueError(
            f"ring_associative_recall: this rank holds {T_local} tokens but total_length "
            f"{layout.total_length} over context_parallel_size {cp_size} gives {plan.local_length}"
        )
    # Checked once per layout (a host sync): the layers of a micro-batch share its layout.
    if not layout.cache.get(("cp_positions_checked", plan)) and not torch.equal(
        layout.positions, plan.global_index(layout.positions.device).expand_as(layout.positions)
    ):
        raise ValueError(
            "ring_associative_recall: layout.positions are not this rank's load-balanced chunks "
            f"(rank {cp_rank} of {cp_size} holds chunks {plan.chunks}); split the full-sequence "
            "layout with split_for_context_parallel"
        )
    layout.cache[("cp_positions_checked", plan)] = True
    rows = tile_rows or default_tile_rows(plan, B, H, max_tile_elements)
    # The tiles' document bounds cost one host transfer: once per layout and tile size.
    tiles = layout.derived(("cp_query_tiles", plan, rows), lambda: make_query_tiles(plan, layout.doc_starts, rows))
    exchange = PeerExchange(group) if cp_size > 1 else None
    ring = _Ring(plan, visibility, exchange)
    return _RingRecall.apply(queries, keys, values, layout.doc_starts, ring, tiles)

