"""Gated linear recurrences (the key extractors' leaky averages) as O(T·D) scans.

h_t = exp(log_decay_t) · h_{t-1} · [t is not a document start] + exp(log_gain_t) · x_t

v1: log_decay = -λ_h (constant per head), log_gain = 0.
v2: log_decay_t = -|W_λ x_t|, log_gain_t = W_g x_t (unbounded: computed in log space).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class RecurrenceState:
    """A recurrence state kept as value · exp(log_scale) so unbounded gains never overflow.

    value: (B, H, D); log_scale: (B, H, 1).
    """

    value: Tensor
    log_scale: Tensor

    def materialize(self) -> Tensor:
        """value · exp(log_scale), (B, H, D); may overflow for extreme v2 gains (tests only)."""
        raise NotImplementedError


def linear_recurrence(
    inputs: Tensor,
    log_decay: Tensor,
    log_gain: Tensor | None = None,
    resets: Tensor | None = None,
    initial_state: RecurrenceState | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor, RecurrenceState]:
    """Run h_t = exp(log_decay_t)·h_{t-1}·(1 - reset_t) + exp(log_gain_t)·x_t over T.

    inputs:        (B, H, T, D)
    log_decay:     broadcastable to (B, H, T, 1), values <= 0
    log_gain:      broadcastable to (B, H, T, 1), any real; None means 0
    resets:        (B, T) bool, True where h_{t-1} is dropped (document start); None: no resets
    initial_state: h_{-1}; None means zeros. A reset at t=0 drops it.
    Returns (scaled, log_scale, final_state) with h_t = scaled_t · exp(log_scale_t):
    scaled (B, H, T, D) in the inputs' dtype, log_scale (B, H, T, 1) fp32, final_state = h_{T-1}.
    Memory O(B·H·T·D) (chunked: no T×T matrix); computed in fp32.
    """
    raise NotImplementedError
