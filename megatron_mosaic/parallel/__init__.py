"""Context parallelism for Memory Mosaics (spec section 5).

- ``context_parallel``: load-balanced split of a batch and its ``SequenceLayout`` (rank r holds
  chunks r and 2cp−1−r), the inverse gather, and the full-sequence loss mean.
- ``cp_recall``: ring retrieval with log-sum-exp merging and a ring backward; what each rank's
  key segments and query tiles are in ``cp_recall_plan``, one tile against one segment in
  ``cp_recall_blocks``.
- ``cp_recurrence``: key recurrences across ranks by a prefix combine of chunk summaries.
- ``cp_peek``: the value peek across chunk boundaries.
- ``dispatch``: drop-in versions of the ``memory`` functions that switch to the above when the
  Megatron context-parallel group has more than one rank.
"""

from .context_parallel import (
    ChunkPlan,
    context_parallel_info,
    context_parallel_token_mean,
    gather_from_context_parallel,
    slice_batch_for_cp_rank,
    split_for_context_parallel,
)
from .cp_peek import cp_peek_values
from .cp_recall import ring_associative_recall
from .cp_recurrence import cp_linear_recurrence
from .dispatch import associative_recall, causal_attention, context_parallel_size, linear_recurrence, peek_values

__all__ = [
    "ChunkPlan",
    "associative_recall",
    "causal_attention",
    "context_parallel_info",
    "context_parallel_size",
    "context_parallel_token_mean",
    "cp_linear_recurrence",
    "cp_peek_values",
    "gather_from_context_parallel",
    "linear_recurrence",
    "peek_values",
    "ring_associative_recall",
    "slice_batch_for_cp_rank",
    "split_for_context_parallel",
]
