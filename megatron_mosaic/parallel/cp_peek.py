"""The value peek across CP ranks: each chunk's last token mixes in the next chunk's first.

v_t = mix·ṽ_t + (1 − mix)·ṽ_{t+1}: inside a chunk this is local; the last row of chunk g needs
ṽ and the document-start flag of the first token of chunk g+1, which lives on another rank
(or, for the middle chunk pair, on this one). The first tokens of all 2·cp chunks are
all-gathered (2·B·H·D numbers per rank; differentiable, so the peek's gradient reaches the
token's owner) instead of pairing ranks by hand.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..memory.values import peek_values
from .comm import all_gather_stacked
from .context_parallel import ChunkPlan


def cp_peek_values(
    values: Tensor, mix: Tensor, resets: Tensor | None, plan: ChunkPlan, group: dist.ProcessGroup | None
) -> Tensor:
    """Context-parallel ``peek_values`` over this rank's two load-balanced chunks.

    values (B, H, 2c, D) projected ṽ; mix broadcastable to (1, H, 1, 1); resets (B, 2c) bool
    from the global layout, or None when none of *this rank's* tokens starts a document (the
    next chunk's first token may still start one: that flag is always exchanged). The last chunk of the sequence peeks at ṽ_T = 0.
    Returns (B, H, 2c, D).
    """
    B, H, T, D = values.shape
    if T != plan.local_length:
        raise ValueError(f"cp_peek_values: values hold {T} tokens, expected {plan.local_length}")
    c = plan.chunk_size
    # Always exchanged: a rank whose own tokens have no document start (resets None) still
    # needs to know whether the next chunk begins a document. One all-gather carries ṽ of each
    # chunk's first token and that token's document-start flag as an extra channel.
    local_resets = resets if resets is not None else torch.zeros(B, T, dtype=torch.bool, device=values.device)
    flags = local_resets[:, 0:T:c].to(values.dtype)[:, None, :, None].expand(B, H, 2, 1)
    gathered = all_gather_stacked(torch.cat([values[:, :, 0:T:c], flags], dim=-1), group)  # (cp, B, H, 2, D + 1)
    firsts = gathered[..., :D]
    first_resets = gathered[:, :, 0, :, D].detach() > 0.5  # (cp, B, 2)
    outs = []
    for slot, chunk in enumerate(plan.chunks):
        part = values[:, :, slot * c : (slot + 1) * c]
        part_resets = None if resets is None else resets[:, slot * c : (slot + 1) * c]
        next_value = next_resets = None
        if chunk + 1 < plan.num_chunks:
            rank, next_slot = plan.owner(chunk + 1)
            next_value = firsts[rank, :, :, next_slot : next_slot + 1]
            next_resets = first_resets[rank, :, next_slot]
        outs.append(peek_values(part, mix, part_resets, next_value, next_resets))
    return torch.cat(outs, dim=2)
