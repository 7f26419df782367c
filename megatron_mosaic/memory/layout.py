"""Where each token sits: global position and the start of its document.

Every memory decision (what is visible, where recurrences reset, whether the value peek may look
at the next token, the adaptive-bandwidth count n_t) is a function of *global* positions and
document starts, so the same code serves a whole sequence on one device and a context-parallel
rank holding two non-adjacent chunks of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SequenceLayout:
    """Global coordinates of the tokens a rank holds.

    positions:    (B, T) int64, global position of each token in the full packed sequence.
    doc_starts:   (B, T) int64, global position at which that token's document starts
                  (all zeros when there is one document per sequence / no document masking).
    total_length: number of tokens in the full, unsplit sequence.
    """

    positions: Tensor
    doc_starts: Tensor
    total_length: int

    @staticmethod
    def contiguous(batch_size: int, seq_len: int, device: torch.device | str | None = None) -> "SequenceLayout":
        """One document per sequence, positions 0..seq_len-1."""
        raise NotImplementedError

    @staticmethod
    def from_tokens(tokens: Tensor, eod_token: int) -> "SequenceLayout":
        """Documents packed in (B, T) tokens, separated by ``eod_token``.

        The EOD token belongs to the document it ends; the token after it starts a new document.
        """
        raise NotImplementedError

    @property
    def resets(self) -> Tensor:
        """(B, T) bool: True where a document starts (recurrences reset, memories start empty)."""
        raise NotImplementedError

    @property
    def single_document(self) -> bool:
        """True when no token here starts a document after global position 0 (fast paths)."""
        raise NotImplementedError

    def index_select(self, index: Tensor) -> "SequenceLayout":
        """The layout of the tokens at local indices ``index`` (1-D, along T); total_length kept."""
        raise NotImplementedError
