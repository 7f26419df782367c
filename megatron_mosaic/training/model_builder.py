"""Build the model chunks of this rank from run arguments (a parsed namespace or a checkpoint's dict).

One chunk per virtual pipeline stage (a single chunk without interleaving). ``wrap_for_training``
puts each chunk in Megatron ``DistributedDataParallel`` and wires the config hooks the pipeline
schedules call (``finalize_model_grads``).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.transformer.module import Float16Module, MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mosaic.training.arguments import args_from_dict
from megatron_mosaic.training.initialize import device as compute_device
from megatron_mosaic.training.model_kinds import kind_of


def _as_namespace(args: Union[argparse.Namespace, dict[str, Any]]) -> argparse.Namespace:
    return args if isinstance(args, argparse.Namespace) else args_from_dict(args)


def _common_config_fields(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        # Built fp32 (identical initial draws for every precision); --bf16 casts the weights in
        # wrap_for_training (Float16Module). Stages exchange activations in the compute dtype;
        # the forward step casts each stage's output to it (see loop.make_forward_step).
        params_dtype=torch.float32,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        # Full weights are drawn on the CPU, then split: identical initial models for every TP
        # size. Always on without CUDA (the GPU init path forks CUDA RNGs).
        use_cpu_initialization=args.use_cpu_initialization or not torch.cuda.is_available(),
        # Each layer, the embedding, the output layer and the final norm draw from their own
        # stream of this seed (model.init_rng), so PP / virtual PP stages build the layers the
        # single-process model builds, not whatever their rank's RNG stream holds next.
        init_seed=args.seed,
        # The loss is a sum over tokens divided by the global token count (finalize_model_grads),
        # so any DP x micro-batch split of a global batch gives the same gradient.
        calculate_per_token_loss=True,
        # Activation recomputation and sequence parallelism (training/scaling_args.py).
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        sequence_parallel=args.sequence_parallel,
        fp8=args.fp8_format,
        # gloo matches point-to-point messages between two ranks in posting order; Megatron's
        # batched p2p posts "grad to prev" and "activation to next" to the same peer when PP=2
        # with virtual stages, so their order differs between sender and receiver and the
        # tensors arrive swapped. The unbatched path puts the two directions on separate groups.
        batch_p2p_comm=_backend() != "gloo",
    )


def _backend() -> str:
    return dist.get_backend() if dist.is_initialized() else ("nccl" if torch.cuda.is_available() else "gloo")


def transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    """MosaicConfig for mosaic-v1/v2, a Llama-style GPTBaselineConfig for the GPT baseline."""
    fields = _common_config_fields(args)
    version = kind_of(args).mosaic_version
    if version is None:
        from megatron_mosaic.model.gpt_baseline import gpt_baseline_config

        return gpt_baseline_config(**fields)
    from megatron_mosaic.model.config import MosaicConfig

    mosaic = dict(
        mosaic_version=version,
        persistent_memory_size=args.persistent_memory_size,
        short_term_window=args.short_term_window,
        long_term_delay_range=tuple(args.long_term_delay_range),
        long_term_inference_delay=args.long_term_inference_delay,
        bandwidth_theta_init=args.bandwidth_theta_init,
        bandwidth_alpha_init=args.bandwidth_alpha_init,
        document_masking=args.document_masking,
        v1_key_scale_max=args.v1_key_scale_max,
    )
    if version == 1:
        mosaic["add_bias_linear"] = not args.disable_bias_linear
    return MosaicConfig(**mosaic, **fields)


def _build_chunk(args: argparse.Namespace, config: TransformerConfig, vp_stage: Any) -> MegatronModule:
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    eod = getattr(args, "eod_token_id", None)
    if not kind_of(args).is_mosaic:
        from megatron_mosaic.model.gpt_baseline import build_gpt_baseline

        return build_gpt_baseline(config, args.padded_vocab_size, pre_process=pre, post_process=post,
                                  vp_stage=vp_stage, eod_token_id=eod,
                                  document_masking=args.document_masking)
    from megatron_mosaic.model.mosaic_model import MosaicModel
    from megatron_mosaic.model.specs import get_mosaic_layer_local_spec, get_mosaic_layer_te_spec

    version = config.mosaic_version
    spec = (get_mosaic_layer_te_spec(version) if args.transformer_impl == "transformer_engine"
            else get_mosaic_layer_local_spec(version))
    return MosaicModel(config, args.padded_vocab_size, pre_process=pre, post_process=post,
                       vp_stage=vp_stage, eod_token_id=eod, layer_spec=spec)


def build_model(args: Union[argparse.Namespace, dict[str, Any]],
                device: Union[torch.device, str, None] = None) -> list[MegatronModule]:
    """This rank's model chunks, unwrapped, on ``device`` (None: the current CUDA device when
    there is one, as Megatron-LM's ``get_model``, else the CPU); parallel_state must be initialised.

    ``args`` needs ``padded_vocab_size`` (set by ``pretrain_mosaic.py`` from the tokenizer and
    saved in every checkpoint) and optionally ``eod_token_id`` for document masking.
    With ``--use-cpu-initialization`` the weights are drawn on the CPU and moved here, so DDP's
    buffers, the data and the weights share one device.
    """
    args = _as_namespace(args)
    if getattr(args, "padded_vocab_size", None) is None:
        raise ValueError("build_model: args.padded_vocab_size is not set (derive it from the "
                         "tokenizer with megatron_mosaic.training.model_builder.pad_vocab_size)")
    config = transformer_config_from_args(args)
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = list(range(vp_size)) if vp_size and vp_size > 1 else [None]
    device = compute_device() if device is None else torch.device(device)
    return [_build_chunk(args, config, vp).to(device) for vp in stages]


def pad_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Pad to a multiple of lcm(divisible_by, TP) so every TP rank gets equal rows.

    Megatron-LM pads to divisible_by x TP; the lcm gives the same size for every power-of-two
    TP up to divisible_by, so a checkpoint keeps its embedding shape when TP changes.
    """
    multiple = math.lcm(divisible_by, tp_size)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def wrap_for_training(chunks: list[MegatronModule], use_distributed_optimizer: bool = False,
                      overlap_grad_reduce: bool = False,
                      overlap_param_gather: bool = False,
                      bf16: bool = False) -> list[DistributedDataParallel]:
    """Megatron DDP around each chunk (fp32 grad buffers, reduced in finalize_model_grads;
    reduce-scattered into each DP rank's shard for Megatron's DistributedOptimizer). With
    ``overlap_grad_reduce`` each bucket's reduction starts during the last micro-batch's backward;
    with ``overlap_param_gather`` (distributed optimizer) the all-gather of the updated
    parameters is left to DDP's forward pre-hooks: each bucket's is started asynchronously and
    waited for just before the first module using it runs (and the next bucket's started)."""
    if bf16:  # Megatron-LM's --bf16: bf16 weights (the optimizer keeps fp32 main copies)
        chunks[0].config.bf16 = True  # one config object, shared by every chunk
        chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                               use_distributed_optimizer=use_distributed_optimizer,
                                               overlap_param_gather=overlap_param_gather)
    wrapped = [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                # Megatron-LM: only the first chunk's grads use buckets.
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config = wrapped[0].config
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:  # as Megatron-LM: no reduction in earlier micro-batches, then start it
        no_sync = [chunk.no_sync for chunk in wrapped]
        start = [chunk.start_grad_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(wrapped) == 1 else no_sync
        config.grad_sync_func = start[0] if len(wrapped) == 1 else start
    return wrapped
