"""The value extractor's one-token peek: v_t mixes ṽ_t with ṽ_{t+1}."""

from __future__ import annotations

import torch
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
    if values.dim() != 4:
        raise ValueError(f"peek_values: values must be (B, H, T, D), got shape {tuple(values.shape)}")
    B, H, T, D = values.shape
    if next_value is not None and next_value.shape != (B, H, 1, D):
        raise ValueError(f"peek_values: next_value must be (B, H, 1, D) = {(B, H, 1, D)}, "
                         f"got {tuple(next_value.shape)}")
    if resets is not None and resets.shape != (B, T):
        raise ValueError(f"peek_values: resets must be (B, T) = {(B, T)}, got {tuple(resets.shape)}")
    if next_resets is not None and next_resets.shape != (B,):
        raise ValueError(f"peek_values: next_resets must be (B,) = {(B,)}, got {tuple(next_resets.shape)}")
    nxt = values[:, :, 1:]
    if resets is not None:
        # masked_fill (not multiply) so a non-finite ṽ of the next document cannot leak in.
        nxt = nxt.masked_fill(resets[:, None, 1:, None], 0.0)
    if next_value is None:  # ṽ_T = 0: a zero pad, one op (no zeros + cat)
        nxt = torch.nn.functional.pad(nxt, (0, 0, 0, 1))
    else:
        tail = next_value.to(values.dtype)
        if next_resets is not None:
            tail = tail.masked_fill(next_resets[:, None, None, None], 0.0)
        nxt = torch.cat([nxt, tail], dim=2)
    # mix·ṽ_t + (1 - mix)·ṽ_{t+1} with the product and sum in one op (addcmul)
    return torch.addcmul((1 - mix) * nxt, mix, values)
