"""The key recurrences across CP ranks: a prefix combine of per-chunk summaries.

h_t = exp(a_t)·h_{t−1}·(1 − reset_t) + exp(g_t)·x_t is linear in h, so a chunk acts on the state
entering it as h_out = F + [no reset in chunk]·exp(A)·h_in, with F the chunk's own final state
(started from zero) and A its total log decay. Each rank scans its two chunks from zero, the
(F, A, reset) summaries of all 2·cp chunks are all-gathered (differentiable: the backward
reduce-scatters the summaries' gradients to their owners), every rank folds the summaries of
the chunks before each of its own in global order, and rescans its chunks from the state
entering them. No rank waits for another rank's scan: the only serial part is a fold over
2·cp tiny (B, H, D) states.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..memory.scan import DEFAULT_CHUNK_SIZE, RecurrenceState, linear_recurrence
from .comm import all_gather_stacked
from .context_parallel import ChunkPlan


def _combine(state: RecurrenceState | None, log_decay: Tensor, reset: Tensor, chunk_final: RecurrenceState) -> RecurrenceState:
    """State after a chunk = its own final state + [no reset]·exp(total decay)·state before it.

    log_decay (B, H, 1) finite; reset (B,) bool. Kept as value·exp(log_scale), all finite.
    """
    if state is None:
        return chunk_final
    carried = log_decay + state.log_scale
    log_scale = torch.maximum(chunk_final.log_scale, carried)
    value = chunk_final.value * torch.exp(chunk_final.log_scale - log_scale) + state.value * torch.exp(carried - log_scale)
    keep = ~reset.view(-1, 1, 1)
    return RecurrenceState(
        torch.where(keep, value, chunk_final.value), torch.where(keep, log_scale, chunk_final.log_scale)
    )


def cp_linear_recurrence(
    inputs: Tensor,
    log_decay: Tensor,
    log_gain: Tensor | None,
    resets: Tensor | None,
    plan: ChunkPlan,
    group: dist.ProcessGroup | None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor, RecurrenceState]:
    """Context-parallel ``linear_recurrence`` over this rank's two load-balanced chunks.

    inputs (B, H, 2c, D); log_decay / log_gain broadcastable to (B, H, 2c, 1); resets (B, 2c)
    bool from the *global* layout (a chunk starting mid-document has no reset at its start).
    Returns (scaled, log_scale, state): h_t = scaled_t·exp(log_scale_t) for this rank's tokens,
    identical to the full-sequence scan's rows, and the state after this rank's last token.
    """
    B, H, T, D = inputs.shape
    if T != plan.local_length:
        raise ValueError(f"cp_linear_recurrence: inputs hold {T} tokens, expected {plan.local_length}")
    c = plan.chunk_size
    a = log_decay.to(torch.float32).expand(B, H, T, 1)
    g = None if log_gain is None else log_gain.to(torch.float32).expand(B, H, T, 1)
    chunk_resets = (
        torch.zeros(B, 2, dtype=torch.bool, device=inputs.device)
        if resets is None else resets.reshape(B, 2, c).any(dim=2)
    )

    def part(x: Tensor | None, slot: int) -> Tensor | None:
        return None if x is None else x[:, :, slot * c : (slot + 1) * c]

    def part_resets(slot: int) -> Tensor | None:
        return None if resets is None else resets[:, slot * c : (slot + 1) * c]

    # Pass 1: each chunk from a zero state -> summaries (F, A).
    first = [linear_recurrence(part(inputs, s), part(a, s), part(g, s), part_resets(s), None, chunk_size) for s in range(2)]
    # One all-gather per call (latency, not bandwidth, is what costs here): per chunk the final
    # state, its log scale, the total log decay and the reset flag (0/1, same for every head).
    flags = chunk_resets.t().to(torch.float32)[:, :, None, None].expand(2, B, H, 1)
    summary = torch.stack([
        torch.cat([first[s][2].value, first[s][2].log_scale, part(a, s).sum(dim=2), flags[s]], dim=-1)
        for s in range(2)
    ])  # (2, B, H, D + 3)
    gathered = all_gather_stacked(summary, group)  # (cp, 2, B, H, D + 3)
    all_flags = gathered[..., 0, D + 2].detach() > 0.5  # (cp, 2, B)

    # Fold the summaries in global chunk order up to this rank's last chunk.
    entering: dict[int, RecurrenceState | None] = {}
    state: RecurrenceState | None = None
    for chunk in range(max(plan.chunks) + 1):
        entering[chunk] = state
        rank, slot = plan.owner(chunk)
        row = gathered[rank, slot]
        final = RecurrenceState(row[..., :D], row[..., D : D + 1])
        state = _combine(state, row[..., D + 1 : D + 2], all_flags[rank, slot], final)

    # Pass 2: rescan each chunk from the state entering it (chunk 0 has none: pass 1 is exact).
    outs = []
    for slot, chunk in enumerate(plan.chunks):
        init = entering[chunk]
        if init is None:
            outs.append(first[slot])
        else:
            outs.append(linear_recurrence(part(inputs, slot), part(a, slot), part(g, slot), part_resets(slot), init, chunk_size))
    scaled = torch.cat([o[0] for o in outs], dim=2)
    log_scale = torch.cat([o[1] for o in outs], dim=2)
    return scaled, log_scale, outs[1][2]
