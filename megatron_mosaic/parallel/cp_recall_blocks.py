"""Ring retrieval's block math: one query tile against one contiguous key segment.

Flash-attention style in plain torch: queries in row tiles, scores for one tile × one contiguous
key range at a time (never a T×T matrix), fp32 softmax statistics merged by the online-softmax
(log-sum-exp) rule, and a backward that recomputes the scores. Which blocks a tile visits comes
from ``cp_recall_plan``; the ring that feeds these functions the received rows is ``cp_recall``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..memory.retrieval import Visibility
from .cp_recall_plan import QueryTile, Segment, _visible_blocks


def _scores(q_tile: Tensor, keys: Tensor, mask: Tensor | None) -> Tensor:
    scores = torch.matmul(q_tile, keys.transpose(-1, -2))
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return scores


def _safe(lse: Tensor) -> Tensor:
    """-inf (empty row) -> 0 so exp(x - lse) stays 0 instead of NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


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

