"""The per-micro-batch context every layer receives besides its hidden states.

It travels in TransformerBlock's ``packed_seq_params`` slot: Megatron hands that argument
unchanged to every layer, also inside its activation-recompute path (where it is closed over,
not saved as a tensor), and its attention code only looks at it when ``qkv_format == "thd"``.
The ``attention_mask`` slot stays free (None), as in a Megatron model without masks.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams

from ..memory import SequenceLayout


@dataclasses.dataclass(init=False, eq=False)
class MemoryContext(PackedSeqParams):
    """Per-micro-batch facts, decided once (one device sync at most) instead of in every layer.

    layout:          global positions and document starts of the tokens this rank holds.
    long_term_delay: v2 long-term memory delay m (query t reads pairs i <= t - m); the same
                     value on every rank and layer for one step. Ignored by v1 and the baseline.
    whole_sequence:  fast path: this rank holds one whole document (no resets, no masks
                     beyond causal ones); never true under context parallelism.
    cp_group:        the context-parallel group the memories' rings run over (None: CP = 1).

    The inherited PackedSeqParams fields say "ordinary [s, b, ...] tensors" (``qkv_format``
    ``"sbhd"``) and give the full sequence length, which GPTModel's rotary embedding reads.
    """

    layout: Optional[SequenceLayout] = None
    long_term_delay: int = 1
    whole_sequence: bool = False

    def __init__(self, layout: SequenceLayout, long_term_delay: int,
                 cp_group: Optional[dist.ProcessGroup] = None, whole_sequence: Optional[bool] = None):
        if int(long_term_delay) < 1:
            raise ValueError(f"MemoryContext.long_term_delay must be >= 1, got {long_term_delay}")
        if not isinstance(layout, SequenceLayout):
            raise TypeError(f"MemoryContext.layout must be a SequenceLayout, got {type(layout).__name__}")
        if cp_group is not None and dist.get_world_size(cp_group) == 1:
            cp_group = None
        super().__init__(qkv_format="sbhd", max_seqlen_q=layout.total_length,
                         max_seqlen_kv=layout.total_length, cp_group=cp_group)
        self.layout = layout
        self.long_term_delay = int(long_term_delay)
        if whole_sequence is None:
            whole_sequence = (cp_group is None and layout.total_length == layout.seq_len
                              and layout.single_document)
        self.whole_sequence = bool(whole_sequence)

    @property
    def resets(self) -> Optional[torch.Tensor]:
        """Document starts for the key recurrences and value peeks, or None when this rank holds
        one whole document (its only start, position 0, is a no-op reset). Under context
        parallelism the starts always go along: other ranks' chunks of the same rows may hold
        starts."""
        return None if self.whole_sequence else self.layout.resets

    @property
    def recall_layout(self) -> Optional[SequenceLayout]:
        """The layout the retrievals mask by, or None for plain causal / delayed visibility."""
        return None if self.whole_sequence else self.layout



def micro_batch_context(tokens: Optional[torch.Tensor], long_term_delay: int, *,
                        layout: Optional[SequenceLayout] = None, eod_token_id: Optional[int] = None,
                        cp_group: Optional[dist.ProcessGroup] = None,
                        hidden_shape: Optional[torch.Size] = None,
                        device: Optional[torch.device] = None) -> MemoryContext:
    """The MemoryContext of one micro-batch, built once by the training step (or the model).

    layout:       this rank's layout (required under context parallelism, where it carries the
                  global positions of the rank's two chunks); else built from ``tokens``:
                  documents split at ``eod_token_id`` (document masking) or one per row.
    hidden_shape: [s, b, ...] of the hidden states, for a pipeline stage without tokens (only
                  without document masking).
    """
    if layout is None:
        if cp_group is not None and dist.get_world_size(cp_group) > 1:
            raise ValueError(
                "under context parallelism pass the rank's layout "
                "(megatron_mosaic.parallel.slice_batch_for_cp_rank builds it from the full tokens)"
            )
        if tokens is not None:
            layout = (SequenceLayout.from_tokens(tokens, eod_token_id) if eod_token_id is not None
                      else SequenceLayout.contiguous(tokens.shape[0], tokens.shape[1], tokens.device))
        elif hidden_shape is not None and eod_token_id is None:
            layout = SequenceLayout.contiguous(hidden_shape[1], hidden_shape[0], device)
        else:
            raise ValueError("pass input_ids or a layout on every pipeline stage "
                             "(document masking needs the document starts in every layer)")
    return MemoryContext(layout, long_term_delay, cp_group=cp_group)
