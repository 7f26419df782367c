"""The value extractor's one-token peek: v_t mixes ṽ_t with ṽ_{t+1}."""

from __future__ import annotations

from torch import Tensor


def peek_values(
    values: Tensor,
    mix: Tensor,
    resets: Tensor | None = None,
    next_value: Tensor | None = None,
    next_resets: Tensor | None = None,
) -> Tensor:
    """v_t = mix·ṽ_t + (1 - mix)·ṽ_{t+1}.

    values:      (B, H, T, D) projected values ṽ
    mix:         broadcastable to (1, H, 1, 1): per-head c_h (v1) / γ_h (v2)
    resets:      (B, T) bool document starts; ṽ_{t+1} counts as 0 where t+1 starts a document
    next_value:  (B, H, 1, D) ṽ of the token after this chunk (context parallel); None: the
                 sequence ends here and ṽ_T = 0
    next_resets: (B,) bool, True where that next token starts a document (its ṽ then counts as 0)
    Returns (B, H, T, D).
    """
    raise NotImplementedError
