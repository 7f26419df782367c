"""A device-agnostic core attention for Megatron's SelfAttention, on torch SDPA.

Megatron's local DotProductAttention allocates its score buffer on the CUDA device
(platform facts), so the GPT baseline uses this module instead. Same constructor and forward
contract as DotProductAttention: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np·hn].
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from ..parallel.dispatch import causal_attention, context_parallel_size
from .context import MemoryContext


def _document_mask(layout) -> Tensor:
    """[b, 1, s, s] bool, True = masked out (Megatron's convention): keys after the query or in
    another document."""
    pos, starts = layout.positions, layout.doc_starts
    visible = (pos[:, None, :] <= pos[:, :, None]) & (starts[:, :, None] == starts[:, None, :])
    return ~visible.unsqueeze(1)


class SDPACoreAttention(MegatronModule):
    """softmax(q kᵀ · scale + mask) v with ``F.scaled_dot_product_attention``.

    The micro-batch's MemoryContext arrives in ``packed_seq_params`` (model/context.py). Unless
    it says this rank holds one whole document, attention is causal and document-masked by the
    layout's global positions, through the memory retrieval (``parallel.dispatch.
    causal_attention``: the ring over the context's CP group). Otherwise ``attention_mask`` is
    None (plain causal SDPA) or a bool tensor broadcastable to [b, 1, sq, sk], Megatron's
    convention (True = masked out).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.tp_group = pg_collection.tp
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.hidden_size_per_partition = divide(config.kv_channels * config.num_attention_heads, self.tp_group.size())
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.current_max_attn_logits = None  # read by Megatron's optional qk-clip code

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: attention_bias is not supported")
        if packed_seq_params is not None and not isinstance(packed_seq_params, MemoryContext):
            raise NotImplementedError("SDPACoreAttention: THD packed sequences are not supported; "
                                      "pass a MemoryContext (document masking by layout)")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, hn)
        if k.shape[1] != q.shape[1]:  # grouped-query attention
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        dropout_p = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and not packed_seq_params.whole_sequence:
            context = packed_seq_params
            if dropout_p == 0:
                out = causal_attention(q, k, v, self.softmax_scale, context.layout, group=context.cp_group)
                return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)
            if context.cp_group is not None:
                raise NotImplementedError("SDPACoreAttention: attention dropout under context parallelism "
                                          "(use --attention-dropout 0)")
            # Dropout needs SDPA's own kernel: the document mask as an explicit (s, s) mask.
            attention_mask = _document_mask(context.layout)
        if attention_mask is None and context_parallel_size() > 1:
            raise ValueError("SDPACoreAttention: context parallelism needs a MemoryContext (packed_seq_params)")
        # Dropout inside a TP region needs the model-parallel RNG stream (as DotProductAttention).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 else nullcontext()
        with rng:
            if attention_mask is None:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.softmax_scale)
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=~attention_mask.bool(), dropout_p=dropout_p, scale=self.softmax_scale
                )
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)
