"""Communication primitives for context parallelism, backend-neutral (gloo and NCCL).

Only torch.distributed calls that both backends implement: flat all-gather and reduce-scatter
(``all_gather_single`` / ``reduce_scatter_single``, formerly ``*_into_tensor`` / ``*_tensor``)
and batched isend/irecv.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


# torch 2.13 renamed the flat collectives (the old names warn); older torch only has the old ones.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherStacked(torch.autograd.Function):
    """Stack every rank's tensor on a new leading dim; backward sums the slot gradients home."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        size = dist.get_world_size(group)
        flat = tensor.contiguous().view(-1)  # gloo wants a flat concatenation on dim 0
        out = flat.new_empty(size * flat.numel())
        _all_gather_flat(out, flat, group=group)
        return out.view(size, *tensor.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Every rank's loss may depend on every slot: the slot's owner receives the sum.
        flat = grad.contiguous().view(-1)
        out = flat.new_empty(flat.numel() // grad.shape[0])
        _reduce_scatter_flat(out, flat, group=ctx.group)
        return out.view(grad.shape[1:]), None


def all_gather_stacked(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """(cp, *tensor.shape): every CP rank's ``tensor``, differentiable (backward = reduce-scatter)."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor.unsqueeze(0)
    return _AllGatherStacked.apply(tensor, group)


@dataclass
class PendingExchange:
    """Outstanding point-to-point transfers; ``wait()`` returns the received tensors by key."""

    works: list = field(default_factory=list)
    received: dict = field(default_factory=dict)
    sent: list = field(default_factory=list)  # keep send buffers alive until completion

    def wait(self) -> dict:
        for work in self.works:
            work.wait()
        self.works.clear()
        self.sent.clear()
        return self.received


class PeerExchange:
    """Batched isend/irecv inside a process group, addressed by group rank.

    Each call of ``post`` launches its transfers at once (``batch_isend_irecv``) and returns
    without waiting, so the caller computes while the data moves.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.global_ranks = [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))]

    def post(
        self,
        sends: list[tuple[int, Tensor]],
        recvs: list[tuple[int, object, tuple[int, ...], torch.dtype]],
        device: torch.device,
        tag: int = 0,
    ) -> PendingExchange:
        """sends: (peer, tensor); recvs: (peer, key, shape, dtype). Empty tensors are not sent.

        Both ends must agree on which messages exist and their order: callers derive them from
        the same deterministic schedule on every rank.
        """
        pending = PendingExchange()
        ops = []
        for peer, tensor in sends:
            if tensor.numel() == 0:
                continue
            tensor = tensor.contiguous()
            pending.sent.append(tensor)
            ops.append(dist.P2POp(dist.isend, tensor, self.global_ranks[peer], self.group, tag))
        for peer, key, shape, dtype in recvs:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            pending.received[key] = buffer
            if buffer.numel() == 0:
                continue
            ops.append(dist.P2POp(dist.irecv, buffer, self.global_ranks[peer], self.group, tag))
        if ops:
            pending.works = dist.batch_isend_irecv(ops)
        return pending

