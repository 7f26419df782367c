"""A Llama-style transformer baseline from the same pieces: Megatron's GPTModel with RMSNorm,
SwiGLU, RoPE, untied output, SDPA core attention, and MosaicModel's forward signature."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from ..memory import SequenceLayout
from .config import GPTBaselineConfig
from .context import MemoryContext, micro_batch_context
from .init_rng import CONSTRUCTION, EMBEDDING, OUTPUT_LAYER, init_rng, init_seed_of, redraw_vocab_weight
from .module import param_device
from .specs import get_gpt_baseline_block_spec


def gpt_baseline_config(**kwargs: Any) -> GPTBaselineConfig:
    """GPTBaselineConfig (a TransformerConfig plus ``init_seed``) with the Llama-style fields set
    (RMSNorm, SwiGLU, no bias, no dropout); ``kwargs`` (sizes, parallelism, init_seed, ...) are
    passed through and may override them."""
    fields = dict(
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    fields.update(kwargs)
    return GPTBaselineConfig(**fields)


def _check_llama_style(config: TransformerConfig) -> None:
    expected = {
        "normalization": (config.normalization == "RMSNorm", "'RMSNorm'"),
        "gated_linear_unit": (config.gated_linear_unit is True, "True"),
        "activation_func": (config.activation_func is F.silu, "torch.nn.functional.silu"),
        "add_bias_linear": (config.add_bias_linear is False, "False"),
    }
    for name, (ok, want) in expected.items():
        if not ok:
            raise ValueError(
                f"build_gpt_baseline: config.{name} must be {want} for the Llama-style baseline "
                f"(got {getattr(config, name)!r}); gpt_baseline_config() sets these"
            )


class LocalRotaryEmbedding(RotaryEmbedding):
    """Megatron's RotaryEmbedding, device-agnostic: the frequencies are a (non-persistent)
    buffer that follows ``module.to(device)`` (upstream moves them to
    ``torch.cuda.current_device()``), and the context-parallel slice needs no pinned memory."""

    def __init__(self, *args: Any, device: Optional[torch.device] = None, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "use_cpu_initialization": True})
        inv_freq = self.inv_freq.to(device)  # created on the parameters' device, not forced to the CPU
        del self.inv_freq
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
        """[max_seq_len, 1, 1, dim] rotation angles (same layout as upstream)."""
        return self._angles(self.get_freqs_non_repeated(max_seq_len, offset))

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> Tensor:
        """Angles of the whole sequence, cut to this CP rank's load-balanced chunks r, 2cp-1-r."""
        emb = self.get_emb(max_seq_len, offset)
        group = cp_group if cp_group is not None else self.cp_group
        if packed_seq or group is None or group.size() == 1:
            return emb
        size, rank = group.size(), group.rank()
        chunks = emb.chunk(2 * size, dim=0)
        return torch.cat((chunks[rank], chunks[2 * size - 1 - rank]), dim=0)

    def at_positions(self, positions: Tensor) -> Tensor:
        """[s, 1, 1, dim] angles for explicit global positions (s,): context-parallel chunks
        need no slicing and no config.context_parallel_size bookkeeping."""
        freqs = torch.outer(positions.to(self.inv_freq), self.inv_freq)
        if self.seq_len_interpolation_factor is not None:
            freqs = freqs / self.seq_len_interpolation_factor
        return self._angles(freqs)

    def _angles(self, freqs: Tensor) -> Tensor:
        if self.rotary_interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]


class GPTBaseline(GPTModel):
    """GPTModel whose forward matches MosaicModel's: ``forward(input_ids, labels=None,
    layout=None, long_term_delay=None)``; ``long_term_delay`` is accepted and ignored.

    Document masking: attention never crosses EOD when a layout is passed, or when
    ``document_masking`` and ``eod_token_id`` are set (layout built from the tokens). With a
    layout, RoPE uses its global positions (one set for all rows, as in packed pretraining) and
    the MemoryContext reaches SDPACoreAttention through Megatron's ``packed_seq_params`` slot,
    so context parallelism only needs the rank's layout (``parallel.slice_batch_for_cp_rank``).

    Initial weights: with ``config.init_seed`` set, every layer and the final norm draw from
    their own streams (``get_gpt_baseline_block_spec``); GPTModel builds the embedding and output
    layer itself, so they are drawn again from their streams afterwards, exactly as their
    constructors would draw them there (as MosaicModel's). Construction runs in a scope of its
    own, so it leaves the caller's generators untouched.
    """

    def __init__(self, config: TransformerConfig, *args: Any, eod_token_id: Optional[int] = None,
                 document_masking: bool = True, rotary_base: int = 10000, **kwargs: Any):
        with init_rng(init_seed_of(config), CONSTRUCTION):  # its draws are all replaced or discarded
            super().__init__(config, *args, rotary_base=rotary_base, **kwargs)
        self._redraw_embedding_and_output()
        self.rotary_pos_emb = LocalRotaryEmbedding(
            kv_channels=self.config.kv_channels, rotary_percent=1.0, rotary_interleaved=self.config.rotary_interleaved,
            rotary_base=rotary_base, cp_group=self.pg_collection.cp, device=param_device(self.config),
        )
        self.eod_token_id = eod_token_id
        self.document_masking = document_masking

    def _redraw_embedding_and_output(self) -> None:
        """The embedding and output weights from their own streams (no-op without init_seed)."""
        tp_group = self.pg_collection.tp
        if self.pre_process:
            redraw_vocab_weight(self.embedding.word_embeddings.weight, self.vocab_size, self.config.embedding_init_method,
                                self.config, tp_group, EMBEDDING, params_dtype=self.config.params_dtype)
        if self.post_process:
            redraw_vocab_weight(self.output_layer.weight, self.vocab_size, self.config.init_method,
                                self.config, tp_group, OUTPUT_LAYER)

    def forward(self, input_ids: Optional[Tensor], labels: Optional[Tensor] = None,
                layout: Optional[SequenceLayout] = None, long_term_delay: Optional[int] = None,
                packed_seq_params: Optional[MemoryContext] = None, **kwargs: Any) -> Tensor:
        """As MosaicModel.forward: the micro-batch's MemoryContext reaches SDPACoreAttention
        through Megatron's ``packed_seq_params`` channel (built here when not passed)."""
        context = packed_seq_params
        if context is None:
            eod = self.eod_token_id if self.document_masking and input_ids is not None else None
            stage_input = self.decoder.input_tensor  # a later pipeline stage's hidden states
            try:
                context = micro_batch_context(
                    input_ids, 1, layout=layout, eod_token_id=eod, cp_group=self.pg_collection.cp,
                    hidden_shape=None if stage_input is None else stage_input.shape,
                    device=None if stage_input is None else stage_input.device)
            except ValueError as err:
                raise ValueError(f"GPTBaseline.forward: {err}") from None
        # RoPE at the layout's global positions (one set for all rows, as in packed pretraining).
        position_ids = None if context.whole_sequence else context.layout.positions
        return super().forward(input_ids, position_ids, None, labels=labels, packed_seq_params=context, **kwargs)

    def _preprocess(self, input_ids, position_ids, *args: Any, **kwargs: Any):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        if position_ids is None or self.position_embedding_type != "rope":
            return out
        return (out[0], self.rotary_pos_emb.at_positions(position_ids[0])) + tuple(out[2:])


def build_gpt_baseline(config: TransformerConfig, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                       vp_stage: Optional[int] = None, *, max_sequence_length: int = 0,
                       eod_token_id: Optional[int] = None, document_masking: bool = True,
                       rotary_base: int = 10000) -> GPTBaseline:
    """The Llama-style GPT baseline (RoPE, untied embeddings, SDPA attention)."""
    _check_llama_style(config)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return GPTBaseline(
        config, transformer_layer_spec=get_gpt_baseline_block_spec(config, vp_stage, pp_rank), vocab_size=vocab_size,
        max_sequence_length=max_sequence_length, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=False, position_embedding_type="rope", vp_stage=vp_stage,
        eod_token_id=eod_token_id, document_masking=document_masking, rotary_base=rotary_base,
    )
