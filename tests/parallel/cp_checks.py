"""Shared pieces of the context-parallel tests: full-sequence data, split, gather, compare.

Every check builds the same full-sequence inputs on every rank (fixed seeds), runs the
single-device ``megatron_mosaic.memory`` function on the whole sequence as the reference, runs
the context-parallel version on this rank's chunks, gathers outputs and input gradients back to
full length and compares. Gradients of inputs shared by all tokens (per-head parameters) are
summed over the CP group first, as the DP×CP gradient reduction does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_mosaic.memory import SequenceLayout
from megatron_mosaic.parallel import ChunkPlan, gather_from_context_parallel, split_for_context_parallel

EOD = 0


def packed_tokens(batch: int, length: int, doc_ends: list[list[int]], seed: int = 0) -> Tensor:
    """(B, T) tokens in 1..9 with EOD placed at the given positions per batch row."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 10, (batch, length), generator=gen)
    for b, ends in enumerate(doc_ends):
        for pos in ends:
            tokens[b, pos] = EOD
    return tokens


def assert_close(name: str, got: Tensor, want: Tensor, rtol: float, atol: float = 0.0) -> float:
    """Relative max error (max|got−want| / max|want|) within rtol; returns it."""
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values")
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    rel = err / scale if scale > 0 else err
    if rel > rtol and err > atol:
        raise AssertionError(f"{name}: relative error {rel:.3e} (abs {err:.3e}, scale {scale:.3e}) > {rtol:.1e}")
    return rel


class Splitter:
    """Split full tensors for this CP rank and gather local ones back (seq on dim 2 for (B,H,T,D))."""

    def __init__(self, layout: SequenceLayout, group: dist.ProcessGroup | None) -> None:
        self.group = group
        size = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        self.plan = ChunkPlan(layout.total_length, size, rank)
        self.full_layout = layout
        self.layout, _ = split_for_context_parallel(layout, {}, size, rank)

    def split(self, tensor: Tensor, seq_dim: int = 2) -> Tensor:
        """Local leaf copy of ``tensor`` (requires_grad kept) along ``seq_dim``."""
        _, out = split_for_context_parallel(self.full_layout, {"x": tensor.detach()}, self.plan.cp_size,
                                            self.plan.cp_rank, seq_dim)
        return out["x"].clone().requires_grad_(tensor.requires_grad)

    def gather(self, tensor: Tensor, seq_dim: int = 2) -> Tensor:
        return gather_from_context_parallel(tensor.detach(), self.plan, self.group, seq_dim)

    def sum_shared(self, tensor: Tensor) -> Tensor:
        """Sum a replicated parameter's local gradient over the CP group."""
        tensor = tensor.detach().clone()
        if self.group is not None:
            dist.all_reduce(tensor, group=self.group)
        return tensor
