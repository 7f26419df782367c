"""The Memory Mosaics math on one device, in pure torch (spec sections 1-4).

Layout (B, H, T, D) for per-head tensors. Nothing here knows about Megatron or parallelism;
context parallelism composes these functions (megatron_mosaic.parallel).
"""

from .bandwidth import adaptive_bandwidth
from .layout import SequenceLayout
from .retrieval import Visibility, associative_recall, merge_partial_recalls
from .scan import RecurrenceState, linear_recurrence
from .values import peek_values

__all__ = [
    "RecurrenceState",
    "SequenceLayout",
    "Visibility",
    "adaptive_bandwidth",
    "associative_recall",
    "linear_recurrence",
    "merge_partial_recalls",
    "peek_values",
]
