"""MosaicModel: embedding, a TransformerBlock of Mosaic layers, final norm, output layer, loss."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.pipeline_parallel.utils import is_pp_first_stage, is_vp_first_stage
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor

from ..memory import SequenceLayout
from .config import MosaicConfig
from .context import MemoryContext, micro_batch_context
from .init_rng import EMBEDDING, OUTPUT_LAYER, init_rng, init_seed_of
from .specs import get_mosaic_block_spec, get_mosaic_layer_local_spec


class MosaicModel(LanguageModule):
    """Memory Mosaics language model (v1 or v2, from ``config.mosaic_version``).

    v1: token embedding (no position embedding), LayerNorm blocks, final LayerNorm, output
    layer tied to the embedding. v2: RMSNorm blocks, final RMSNorm, untied output layer.
    Pipeline parallel: ``pre_process`` / ``post_process`` select the embedding / output stages;
    middle stages receive hidden states through ``set_input_tensor``.

    eod_token_id: document separator used to build the SequenceLayout when
    ``config.document_masking`` is on and no layout is passed (None: one document per row).

    Initial weights: with ``config.init_seed`` set, the embedding, each layer, the final norm
    and the output layer draw from their own streams (``model.init_rng``), so every parallel
    layout builds the single-process weights.
    """

    def __init__(self, config: MosaicConfig, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None, *, eod_token_id: Optional[int] = None,
                 layer_spec: Optional[ModuleSpec] = None):
        if not isinstance(config, MosaicConfig):
            raise TypeError(f"MosaicModel needs a MosaicConfig, got {type(config).__name__}")
        super().__init__(config=config)
        tp_size = get_pg_size(self.pg_collection.tp)
        if vocab_size % tp_size:
            raise ValueError(f"MosaicModel: vocab_size {vocab_size} must be divisible by the TP size {tp_size} (pad it)")
        self.vocab_size = vocab_size
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.eod_token_id = eod_token_id
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.share_embeddings_and_output_weights = config.mosaic_version == 1
        self.layer_spec = layer_spec or get_mosaic_layer_local_spec(config.mosaic_version)

        seed = init_seed_of(config)
        if pre_process:
            with init_rng(seed, EMBEDDING):
                self.embedding = LanguageModelEmbedding(
                    config=config, vocab_size=vocab_size, max_sequence_length=0, position_embedding_type="none",
                    tp_group=self.pg_collection.tp,
                )
        self.decoder = TransformerBlock(
            config=config, spec=get_mosaic_block_spec(config, self.layer_spec, vp_stage, self._pp_rank()),
            pre_process=pre_process, post_process=post_process, pg_collection=self.pg_collection, vp_stage=vp_stage,
        )
        if post_process:
            # v2 output σ = 1/√(2d) like the embedding; v1 is tied (the init is overwritten).
            output_init = config.embedding_init_method if config.mosaic_version == 2 else config.init_method
            with init_rng(seed, OUTPUT_LAYER):
                self.output_layer = tensor_parallel.ColumnParallelLinear(
                    config.hidden_size, vocab_size, config=config, init_method=output_init, bias=False,
                    skip_bias_add=False, gather_output=False,
                    skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
                    tp_group=self.pg_collection.tp,
                )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def _pp_rank(self) -> int:
        return get_pg_rank(getattr(self.pg_collection, "pp", None))

    def set_input_tensor(self, input_tensor) -> None:
        """Hidden states from the previous pipeline stage (a list of one tensor, as GPTModel)."""
        if not isinstance(input_tensor, list):
            input_tensor = [input_tensor]
        if len(input_tensor) != 1:
            raise ValueError(f"MosaicModel.set_input_tensor: expected one tensor, got {len(input_tensor)}")
        self.decoder.set_input_tensor(input_tensor[0])

    def setup_embeddings_and_output_layer(self) -> None:
        """Megatron's tied-weight setup without its ``.cuda()`` call, so PP>1 also runs on CPU."""
        if self.pre_process:
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        if self.post_process and self.output_layer.weight is not None:
            self.output_layer.weight.is_embedding_or_output_parameter = True
        if not self.share_embeddings_and_output_weights:
            return
        weight = self.shared_embedding_or_output_weight()
        if get_pg_size(self.pp_group) == 1:
            weight.zero_out_wgrad = True
            return
        first_stage = is_vp_first_stage(self.vp_stage, self.vp_size) and is_pp_first_stage(self.pp_group)
        if first_stage and self.pre_process and not self.post_process:
            weight.shared_embedding = True
        if self.post_process and not self.pre_process:
            # The last stage's copy starts at zero and receives the first stage's values.
            weight.data.fill_(0)
            weight.shared = True
            weight.shared_embedding = True
        if torch.distributed.is_initialized() and self._is_in_embd_group():
            # NCCL reduces CUDA tensors only: under --use-cpu-initialization the weight is still
            # on the CPU here (build_model moves the chunk afterwards), so reduce a CUDA copy.
            data = weight.data
            if data.device.type == "cpu" and torch.distributed.get_backend(self.embd_group) == "nccl":
                data = data.cuda()
            torch.distributed.all_reduce(data, group=self.embd_group)
            if data is not weight.data:
                weight.data.copy_(data)

    def memory_context(self, input_ids: Optional[Tensor], layout: Optional[SequenceLayout],
                       long_term_delay: Optional[int], hidden_shape: Optional[torch.Size] = None) -> MemoryContext:
        """The per-batch MemoryContext every layer receives, when the caller passed none."""
        if long_term_delay is None:
            if self.config.mosaic_version == 2 and self.training:
                raise ValueError(
                    "MosaicModel.forward: long_term_delay is required in training for v2 "
                    "(draw it with sample_long_term_delay(seed, step, *config.long_term_delay_range))"
                )
            long_term_delay = self.config.long_term_inference_delay
        eod = self.eod_token_id if self.config.document_masking else None
        device = self.decoder.input_tensor.device if self.decoder.input_tensor is not None else None
        try:
            return micro_batch_context(input_ids, int(long_term_delay), layout=layout, eod_token_id=eod,
                                       cp_group=self.pg_collection.cp, hidden_shape=hidden_shape, device=device)
        except ValueError as err:
            raise ValueError(f"MosaicModel.forward: {err}") from None

    def forward(self, input_ids: Optional[Tensor], labels: Optional[Tensor] = None,
                layout: Optional[SequenceLayout] = None, long_term_delay: Optional[int] = None,
                packed_seq_params: Optional[MemoryContext] = None) -> Tensor:
        """input_ids (B, T) int64 -> per-token loss (B, T) fp32 if labels else logits (B, T, V/tp).

        ``packed_seq_params``: the micro-batch's MemoryContext, built once by the training step
        (``model.context.micro_batch_context``); without it one is built here from ``layout``,
        ``long_term_delay`` and the tokens. Non-last pipeline stages return hidden states [T, B, d].
        """
        hidden_shape = None
        if self.pre_process:
            if input_ids is None:
                raise ValueError("MosaicModel.forward: input_ids is required on the first pipeline stage")
            hidden = self.embedding(input_ids=input_ids, position_ids=None)  # [T, B, d]
        else:
            hidden = None
            if self.decoder.input_tensor is not None:
                hidden_shape = self.decoder.input_tensor.shape
        context = packed_seq_params
        if context is None:
            context = self.memory_context(input_ids, layout, long_term_delay, hidden_shape)
        elif layout is not None or long_term_delay is not None:
            raise ValueError("MosaicModel.forward: pass either packed_seq_params (a MemoryContext) or "
                             "layout / long_term_delay, not both")
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, packed_seq_params=context)
        if not self.post_process:
            return hidden
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits.float())
