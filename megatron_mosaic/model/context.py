"""What every Mosaic layer needs to know about the current batch besides its hidden states."""

from __future__ import annotations

from dataclasses import dataclass

from ..memory import SequenceLayout


@dataclass(frozen=True)
class MemoryContext:
    """Per-batch memory information, passed to every layer through TransformerBlock's
    ``attention_mask`` slot (Megatron forwards that argument untouched to each layer).

    layout:          global positions and document starts of the tokens this rank holds.
    long_term_delay: v2 long-term memory delay m (query t reads pairs i <= t - m); the same
                     value on every rank and layer for one step. Ignored by v1.
    """

    layout: SequenceLayout
    long_term_delay: int

    def __post_init__(self) -> None:
        if int(self.long_term_delay) < 1:
            raise ValueError(f"MemoryContext.long_term_delay must be >= 1, got {self.long_term_delay}")
