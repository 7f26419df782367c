"""Load-balanced sequence split for context parallelism (spec section 5).

The full sequence of T tokens is cut into 2·cp equal chunks; CP rank r holds chunks r and
2cp−1−r (the same split as Megatron-Core's ``get_batch_on_this_cp_rank`` and its RoPE slicing),
so every rank carries the same amount of causal work. Everything a memory needs to know about
where a token sits travels in a ``SequenceLayout`` whose positions and document starts stay
*global*; the helpers here cut tensors and layouts alike, and put them back together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..memory.layout import SequenceLayout


@dataclass(frozen=True)
class ChunkPlan:
    """Which global chunks one CP rank holds, in its local order [chunk r, chunk 2cp−1−r]."""

    total_length: int
    cp_size: int
    cp_rank: int

    def __post_init__(self) -> None:
        if self.cp_size < 1:
            raise ValueError(f"context_parallel_size must be >= 1, got {self.cp_size}")
        if not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"cp_rank {self.cp_rank} outside [0, {self.cp_size})")
        if self.total_length % (2 * self.cp_size) != 0:
            raise ValueError(
                f"sequence length T={self.total_length} must be a multiple of "
                f"2*context_parallel_size={2 * self.cp_size} (the load-balanced split cuts it into "
                f"2*cp equal chunks); pad or change --seq-length"
            )

    @property
    def num_chunks(self) -> int:
        return 2 * self.cp_size

    @property
    def chunk_size(self) -> int:
        return self.total_length // self.num_chunks

    @property
    def local_length(self) -> int:
        return 2 * self.chunk_size

    def chunks_of(self, rank: int) -> tuple[int, int]:
        """Global chunk ids held by ``rank``, in local order."""
        return rank, self.num_chunks - 1 - rank

    @property
    def chunks(self) -> tuple[int, int]:
        return self.chunks_of(self.cp_rank)

    def owner(self, chunk: int) -> tuple[int, int]:
        """(rank, local slot 0/1) holding global chunk ``chunk``."""
        if chunk < self.cp_size:
            return chunk, 0
        return self.num_chunks - 1 - chunk, 1

    def chunk_start(self, chunk: int) -> int:
        """Global position of the first token of ``chunk``."""
        return chunk * self.chunk_size

    def global_index(self, device: torch.device | str | None = None) -> Tensor:
        """(2c,) int64: global positions of this rank's tokens, in local order."""
        c = self.chunk_size
        low, high = self.chunks
        return torch.cat([
            torch.arange(low * c, (low + 1) * c, device=device),
            torch.arange(high * c, (high + 1) * c, device=device),
        ])


def split_for_context_parallel(
    layout: SequenceLayout,
    tensors: dict[str, Tensor | None],
    cp_size: int,
    cp_rank: int,
    seq_dim: int | dict[str, int] = 1,
) -> tuple[SequenceLayout, dict[str, Tensor | None]]:
    """This CP rank's share of a batch: layout and tensors cut along the sequence.

    layout:  the full-sequence layout (B, T) (build it from the full tokens, *before* the split,
             so document starts are global).
    tensors: name -> tensor with the sequence on ``seq_dim`` (e.g. tokens/labels/loss_mask (B, T),
             or hidden states [T, B, d]); None entries pass through.
    seq_dim: one dim for all tensors, or a per-name dict (missing names use 1).
    Returns (local layout (B, 2c) with global positions, dict of local tensors).
    """
    total = layout.total_length
    if layout.positions.shape[-1] != total:
        raise ValueError(
            f"split_for_context_parallel needs the full-sequence layout: it holds "
            f"{layout.positions.shape[-1]} tokens but total_length is {total}"
        )
    plan = ChunkPlan(total, cp_size, cp_rank)
    index = plan.global_index(layout.positions.device)
    local_layout = layout.index_select(index)
    out: dict[str, Tensor | None] = {}
    for name, tensor in tensors.items():
        if tensor is None:
            out[name] = None
            continue
        dim = seq_dim.get(name, 1) if isinstance(seq_dim, dict) else seq_dim
        if tensor.shape[dim] != total:
            raise ValueError(
                f"tensor '{name}' has {tensor.shape[dim]} entries on dim {dim}, expected the "
                f"sequence length {total}"
            )
        out[name] = tensor.index_select(dim, index.to(tensor.device))
    return local_layout, out


def slice_batch_for_cp_rank(
    batch: dict[str, Tensor], eod_token_id: int | None = None, document_masking: bool = True,
    cp_size: int | None = None, cp_rank: int | None = None,
) -> dict[str, Tensor | SequenceLayout]:
    """The training data path's CP split: this rank's part of a (B, T) micro-batch.

    batch: tokens / labels / loss_mask / position_ids, each (B, T) (other (B, T) entries are cut
    too). The layout is built from the *full* tokens first (document starts at EOD when
    ``document_masking`` and ``eod_token_id`` are set, else one document per row), so the result's
    ``"layout"`` entry carries global positions and document starts: pass it to the model
    (``model(tokens, labels=labels, layout=batch["layout"], ...)``). position_ids become global.
    cp_size / cp_rank: default to Megatron's context-parallel group.
    """
    if cp_size is None or cp_rank is None:
        _, size, rank = context_parallel_info()
        cp_size = size if cp_size is None else cp_size
        cp_rank = rank if cp_rank is None else cp_rank
    tokens = batch["tokens"]
    if document_masking and eod_token_id is not None:
        layout = SequenceLayout.from_tokens(tokens, eod_token_id)
    else:
        layout = SequenceLayout.contiguous(tokens.shape[0], tokens.shape[1], tokens.device)
    if cp_size == 1:
        return {**batch, "layout": layout}
    tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor) and v.dim() >= 2
               and v.shape[:2] == tokens.shape[:2]}
    local_layout, parts = split_for_context_parallel(layout, tensors, cp_size, cp_rank, seq_dim=1)
    return {**batch, **parts, "layout": local_layout}


def gather_from_context_parallel(
    local: Tensor, plan: ChunkPlan, group: dist.ProcessGroup | None, seq_dim: int = 1
) -> Tensor:
    """Inverse of the split: every rank gets the full-sequence tensor (not differentiable).

    local: this rank's tensor with 2c entries on ``seq_dim``. Used for evaluation and tests.
    """
    if plan.cp_size == 1:
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(plan.cp_size)]
    dist.all_gather(parts, local, group=group)
    c = plan.chunk_size
    chunks: list[Tensor | None] = [None] * plan.num_chunks
    for rank, part in enumerate(parts):
        for slot, chunk in enumerate(plan.chunks_of(rank)):
            chunks[chunk] = part.narrow(seq_dim, slot * c, c)
    return torch.cat(chunks, dim=seq_dim)  # type: ignore[arg-type]


def context_parallel_token_mean(
    per_token_loss: Tensor, loss_mask: Tensor | None, group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor]:
    """Mean loss over the *full* sequence when each CP rank holds part of it.

    per_token_loss, loss_mask: this rank's (B, 2c) values.
    Returns (loss_for_backward, full_mean): loss_for_backward = local masked sum / global token
    count, so the parameter gradients *summed* over the CP group (which the DP×CP gradient
    reduction does) equal the gradient of the full-sequence mean; full_mean is the detached
    full-sequence mean, identical on every CP rank, for logging.
    """
    mask = torch.ones_like(per_token_loss) if loss_mask is None else loss_mask.to(per_token_loss.dtype)
    local_sum = (per_token_loss * mask).sum()
    stats = torch.stack([local_sum.detach(), mask.sum()]).float()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    count = stats[1].clamp(min=1.0)
    return local_sum / count, stats[0] / count


def context_parallel_info(group: dist.ProcessGroup | None = None) -> tuple[dist.ProcessGroup | None, int, int]:
    """(group, size, rank) of the CP group: the given group, else Megatron's, else a trivial one."""
    if group is None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_context_parallel_group(check_initialized=False)
    if group is None or not dist.is_initialized():
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)
