"""Ring retrieval's plan: which key rows travel between CP ranks and how queries are tiled.

Everything here is a pure function of global positions and the visibility rule (pair i visible
to t iff t − window < i <= t − delay), known on every rank without communication, so a block the
rule makes empty is neither sent nor computed: the short-term window (delay 1, window h) only
moves a halo of h−1 rows from the two neighbouring chunks, the long-term memory (delay m) skips
chunks closer than m. Document starts prune further on the receiving side (query rows only see
keys at or after their document start): per query tile, ``_visible_blocks`` names the key blocks
it can see and their masks, the same blocks for the forward and the backward
(``cp_recall_blocks``). The ring itself is ``cp_recall``.
"""

from __future__ import annotations

from collections.abc import Iterator

from dataclasses import dataclass

import torch
from torch import Tensor

from ..memory.retrieval import Visibility
from .context_parallel import ChunkPlan

# Budget for one score tile (elements of B·H·rows·keys); bounds peak memory independently of T.
DEFAULT_MAX_TILE_ELEMENTS = 1 << 21


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
# Query tiles and the key blocks each one sees.
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


def default_tile_rows(plan: ChunkPlan, batch: int, heads: int, max_tile_elements: int) -> int:
    """Query rows per tile so one score tile against a whole chunk stays within the budget."""
    rows = max_tile_elements // max(1, batch * heads * plan.chunk_size)
    return max(1, min(plan.chunk_size, rows))

