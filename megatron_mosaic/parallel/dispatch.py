"""Drop-in memory functions that switch to their context-parallel versions when CP > 1.

The layers call these with exactly the signatures of ``megatron_mosaic.memory``; when Megatron's
context-parallel group has more than one rank, the (B, H, T, D) tensors they receive are this
rank's two load-balanced chunks (``split_for_context_parallel``) and the ring / prefix-combine /
peek-exchange versions run instead. With CP = 1 they are the single-device functions, unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import memory
from ..memory.layout import SequenceLayout
from ..memory.retrieval import Visibility
from ..memory.scan import DEFAULT_CHUNK_SIZE, RecurrenceState
from .context_parallel import ChunkPlan, context_parallel_info
from .cp_peek import cp_peek_values
from .cp_recall import ring_associative_recall
from .cp_recurrence import cp_linear_recurrence


def context_parallel_size(group: dist.ProcessGroup | None = None) -> int:
    """Size of the CP group (1 when none is initialised)."""
    return context_parallel_info(group)[1]


def _plan(local_length: int, size: int, rank: int, what: str) -> ChunkPlan:
    if local_length % 2:
        raise ValueError(
            f"{what}: with context parallelism each rank holds two equal chunks, but it got "
            f"{local_length} tokens (odd)"
        )
    return ChunkPlan(local_length * size, size, rank)


def linear_recurrence(
    inputs: Tensor,
    log_decay: Tensor,
    log_gain: Tensor | None = None,
    resets: Tensor | None = None,
    initial_state: RecurrenceState | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor, RecurrenceState]:
    """``memory.linear_recurrence``; under CP the scan state crosses ranks (prefix combine)."""
    group, size, rank = context_parallel_info(group)
    if size == 1:
        return memory.linear_recurrence(inputs, log_decay, log_gain, resets, initial_state, chunk_size)
    if initial_state is not None:
        raise ValueError("linear_recurrence: initial_state is not supported with context parallelism "
                         "(training starts every sequence from zero; decoding runs with CP = 1)")
    plan = _plan(inputs.shape[2], size, rank, "linear_recurrence")
    return cp_linear_recurrence(inputs, log_decay, log_gain, resets, plan, group, chunk_size)


def peek_values(
    values: Tensor,
    mix: Tensor,
    resets: Tensor | None = None,
    next_value: Tensor | None = None,
    next_resets: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """``memory.peek_values``; under CP each chunk's last row peeks at the next chunk's first token."""
    group, size, rank = context_parallel_info(group)
    if size == 1:
        return memory.peek_values(values, mix, resets, next_value, next_resets)
    if next_value is not None or next_resets is not None:
        raise ValueError("peek_values: next_value/next_resets are found by the CP exchange; pass None")
    plan = _plan(values.shape[2], size, rank, "peek_values")
    return cp_peek_values(values, mix, resets, plan, group)


def associative_recall(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    visibility: Visibility,
    query_layout: SequenceLayout | None = None,
    key_layout: SequenceLayout | None = None,
    return_lse: bool = False,
    group: dist.ProcessGroup | None = None,
    fp32_scores: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """``memory.associative_recall``; under CP the (k, v) rows travel the ring.

    Under CP, queries and keys are the same tokens (this rank's chunks) and ``query_layout`` is
    this rank's layout with global positions; None means one document per sequence.
    """
    group, size, rank = context_parallel_info(group)
    if size == 1:
        return memory.associative_recall(queries, keys, values, visibility, query_layout, key_layout, return_lse,
                                         fp32_scores=fp32_scores)
    if return_lse:
        raise ValueError("associative_recall: return_lse is internal to the CP ring; not available with CP > 1")
    if key_layout is not None and (query_layout is None or not (
        key_layout is query_layout or torch.equal(key_layout.positions, query_layout.positions)
    )):
        raise ValueError("associative_recall: with context parallelism keys and queries are the same "
                         "tokens; pass the same layout (or key_layout=None)")
    layout = query_layout
    if layout is None:
        plan = _plan(queries.shape[2], size, rank, "associative_recall")
        full = SequenceLayout.contiguous(queries.shape[0], plan.total_length, device=queries.device)
        layout = full.index_select(plan.global_index(queries.device))
    return ring_associative_recall(queries, keys, values, visibility, layout, group)


def causal_attention(
    queries: Tensor, keys: Tensor, values: Tensor, softmax_scale: float,
    layout: SequenceLayout | None = None, group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Standard causal attention (diagonal included) for the GPT baseline, CP-aware.

    queries, keys, values: (B, H, T_local, D) with the same head count (expand GQA groups
    first). Visibility(delay=0) is exactly the causal mask; with a layout carrying document
    starts it is also document-masked. The softmax scale is folded into the queries. Under
    autocast the kernels run in its dtype, as any transformer's attention (CP = 1; the CP ring
    always accumulates in fp32).
    """
    return associative_recall(queries * softmax_scale, keys, values, Visibility(delay=0), layout, layout, group=group,
                              fp32_scores=False)
