"""Ring retrieval: associative recall with the stored pairs sharded over CP ranks.

Each rank keeps its queries (two load-balanced chunks). At ring step s it receives from rank
r−s exactly the key/value rows its queries can see and sends rank r+s the rows that rank can
see, while it computes on the rows of step s−1; partial recalls merge by the online-softmax
(log-sum-exp) rule in fp32. Which rows are needed, and how queries are tiled, is a pure function
of global positions and the visibility rule (``cp_recall_plan``); the block math on one query
tile × one key segment is ``cp_recall_blocks``. The backward is a ring too: (k, v) rows travel
the same way again, dq stays local, dk/dv go back to the rows' owners.

The plan's and the block math's public names are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..memory.layout import SequenceLayout
from ..memory.precision import fp32_region
from ..memory.retrieval import Visibility
from .comm import PeerExchange
from .context_parallel import ChunkPlan
from .cp_recall_blocks import backward_segments, forward_segments
from .cp_recall_plan import (
    DEFAULT_MAX_TILE_ELEMENTS,
    QueryTile,
    Segment,
    _check_visibility,
    default_tile_rows,
    make_query_tiles,
    message_segments,
    needed_key_range,
)

__all__ = [
    "DEFAULT_MAX_TILE_ELEMENTS", "QueryTile", "Segment", "backward_segments", "default_tile_rows",
    "forward_segments", "make_query_tiles", "message_segments", "needed_key_range",
    "ring_associative_recall",
]

_TAG_K, _TAG_V, _TAG_DK, _TAG_DV = 11, 12, 13, 14


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

