"""Associative-memory retrieval: Gaussian kernel regression over visible pairs, via SDPA.

With unit-norm (or equal-norm) keys, softmax_i(-β‖k - k_i‖²) = softmax_i(β k·k_i): attention
with keys as queries, scale 1, and a visibility rule. Each rule is a causal attention over
shifted inputs (spec section 4), so torch's fused SDPA serves every memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .layout import SequenceLayout


@dataclass(frozen=True)
class Visibility:
    """Which stored pairs a query at global position t may read.

    Pair i is visible iff same document, i <= t - delay, and (window is None or i >= t - window + 1).
    v1 contextual memory: delay=1, window=None. v2 short-term: delay=1, window=h.
    v2 long-term: delay=m, window=None.
    """

    delay: int = 1
    window: int | None = None

    def visible_counts(self, layout: SequenceLayout) -> Tensor:
        """n_t: (B, T) int64 number of visible pairs for each query (closed form)."""
        raise NotImplementedError

    def mask(self, query_layout: SequenceLayout, key_layout: SequenceLayout) -> Tensor:
        """(B, 1, Tq, Tk) bool, True where the key is visible to the query."""
        raise NotImplementedError


def associative_recall(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    visibility: Visibility,
    query_layout: SequenceLayout | None = None,
    key_layout: SequenceLayout | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """y_t = Σ_{i visible to t} softmax_i(q_t · k_i) v_i, with scale 1 (fold β into queries).

    queries: (B, H, Tq, D); keys, values: (B, H, Tk, D).
    Layouts None: both are the same contiguous single-document sequence (the fast shifted-SDPA
    path with no explicit mask where the rule allows it).
    Rows with nothing visible are exactly 0 (never NaN), gradients included.
    return_lse: also return the log-sum-exp of the visible scores, (B, H, Tq) fp32, -inf on
    empty rows, so partial results over key blocks can be merged (context parallelism).
    """
    raise NotImplementedError


def merge_partial_recalls(
    outputs: list[Tensor], lses: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """Merge recalls over disjoint key blocks by the online-softmax rule (fp32).

    outputs[j]: (B, H, Tq, D), lses[j]: (B, H, Tq). Empty rows (all -inf) merge to exactly 0.
    """
    raise NotImplementedError
