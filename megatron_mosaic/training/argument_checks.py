"""Validation of parsed ``pretrain_mosaic.py`` arguments.

``validate_args(args, world_size)`` fills the derived fields (data-parallel size, defaults that
depend on other arguments) and rejects every invalid combination before any work starts, raising
:class:`ArgumentError` with a message naming the offending arguments. It also takes the model
and tokenizer arguments from the ``--load`` checkpoint (``--use-checkpoint-args``), builds the
tokenizer once, and checks the FP8 / Transformer Engine flags against the model and the machine.
"""

from __future__ import annotations

import argparse
import importlib.util

# Stdlib-only modules: arguments still parse before torch/megatron are imported.
from megatron_mosaic.training.megatron_flags import check_megatron_flags
from megatron_mosaic.training.model_kinds import kind_of
from megatron_mosaic.training.observability_args import check_observability_args
from megatron_mosaic.training.scaling_args import check_scaling_args
from megatron_mosaic.training.schedule_args import (
    check_schedule_args,
    derive_schedule,
    scheduler_steps,
)


class ArgumentError(ValueError):
    """An invalid argument or combination of arguments (the message names them)."""


def _derive(args: argparse.Namespace, world_size: int) -> None:
    """Fill derived fields (data-parallel size, defaults that depend on other arguments)."""
    model_parallel = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                      * args.context_parallel_size)
    args.world_size = world_size
    args.data_parallel_size = world_size // model_parallel if model_parallel > 0 else 0
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 3 * args.hidden_size
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * max(args.data_parallel_size, 1)
    if args.attention_dropout is None:  # see --attention-dropout's help
        args.attention_dropout = kind_of(args).attention_dropout
    derive_schedule(args)
    if args.per_position_eval_iters is None:
        args.per_position_eval_iters = args.eval_iters
    if args.eval_seq_length is None:
        args.eval_seq_length = args.seq_length
    args.long_term_delay_range = tuple(args.long_term_delay_range)
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage and args.pipeline_model_parallel_size > 1:
        layers_per_stage = args.num_layers // args.pipeline_model_parallel_size
        args.virtual_pipeline_model_parallel_size = (
            layers_per_stage // args.num_layers_per_virtual_pipeline_stage)


def _warmup_message(args: argparse.Namespace) -> str:
    unit = "iters" if args.train_samples is None else "samples"
    warmup = (f"--lr-warmup-fraction ({args.lr_warmup_fraction})" if args.lr_warmup_fraction is not None
              else f"--lr-warmup-{unit} ({getattr(args, f'lr_warmup_{unit}')})")
    return (f"{warmup} must give a warmup shorter than --lr-decay-{unit} "
            f"({getattr(args, f'lr_decay_{unit}')}, default --train-{unit})")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ArgumentError(message)


def validate_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Derive fields and check every combination; raises :class:`ArgumentError` naming arguments."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size", "log_interval", "eval_interval"):
        value = getattr(args, name)
        _check(value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    tp, pp, cp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.context_parallel_size)
    _check(world_size % (tp * pp * cp) == 0,
           f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
           f"--pipeline-model-parallel-size ({pp}) x --context-parallel-size ({cp})")
    if args.use_checkpoint_args:
        _use_checkpoint_args(args)
    if args.rampup_batch_size is not None:  # the ramp is checked before derive counts its steps
        args.data_parallel_size = world_size // (tp * pp * cp)
        args.global_batch_size = args.global_batch_size or args.micro_batch_size * args.data_parallel_size
    check_schedule_args(args, _check)
    _derive(args, world_size)
    _check(args.train_iters >= 0, f"--train-iters must be >= 0, got {args.train_iters}")
    dp = args.data_parallel_size
    _check(args.hidden_size % args.num_attention_heads == 0,
           f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads "
           f"({args.num_attention_heads})")
    _check(args.num_attention_heads % tp == 0,
           f"--num-attention-heads ({args.num_attention_heads}) must be divisible by "
           f"--tensor-model-parallel-size ({tp})")
    _check(args.ffn_hidden_size % tp == 0,
           f"--ffn-hidden-size ({args.ffn_hidden_size}) must be divisible by "
           f"--tensor-model-parallel-size ({tp})")
    _check(args.num_layers % pp == 0,
           f"--num-layers ({args.num_layers}) must be divisible by "
           f"--pipeline-model-parallel-size ({pp})")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        vs = args.num_layers_per_virtual_pipeline_stage
        _check(pp > 1, "--num-layers-per-virtual-pipeline-stage needs "
                       "--pipeline-model-parallel-size > 1")
        _check(vs >= 1 and (args.num_layers // pp) % vs == 0,
               f"--num-layers ({args.num_layers}) / --pipeline-model-parallel-size ({pp}) must be "
               f"divisible by --num-layers-per-virtual-pipeline-stage ({vs})")
    _check(args.global_batch_size % (args.micro_batch_size * dp) == 0,
           f"--global-batch-size ({args.global_batch_size}) must be divisible by "
           f"--micro-batch-size ({args.micro_batch_size}) x data-parallel size ({dp} = world size "
           f"{world_size} / (TP {tp} x PP {pp} x CP {cp}))")
    vp = args.virtual_pipeline_model_parallel_size
    if vp is not None and vp > 1:
        microbatches = args.global_batch_size // (args.micro_batch_size * dp)
        _check(microbatches % pp == 0,
               f"interleaved pipelining needs the number of micro-batches ({microbatches} = "
               f"--global-batch-size / (--micro-batch-size x DP)) divisible by "
               f"--pipeline-model-parallel-size ({pp})")
    if cp > 1:
        _check(args.seq_length % (2 * cp) == 0,
               f"--seq-length ({args.seq_length}) must be divisible by 2 x "
               f"--context-parallel-size ({cp})")
    _check(args.eval_seq_length >= 1 and args.eval_seq_length % (2 * cp if cp > 1 else 1) == 0,
           f"--eval-seq-length ({args.eval_seq_length}) must be >= 1"
           + (f" and divisible by 2 x --context-parallel-size ({cp})" if cp > 1 else ""))
    steps = scheduler_steps(args)
    _check(steps["lr_warmup_steps"] < steps["lr_decay_steps"] or args.lr_decay_style == "constant"
           or args.train_iters == 0,
           _warmup_message(args))
    if args.lr_decay_style == "WSD":
        _check(steps["wsd_decay_steps"] is not None,
               "--lr-decay-style WSD needs --lr-wsd-decay-iters (or --lr-wsd-decay-samples)")
    if kind_of(args).is_mosaic:
        _check(args.attention_dropout == 0.0,
               f"--attention-dropout {args.attention_dropout}: Mosaic memories have no attention "
               f"probabilities to drop (use --hidden-dropout)")
    _check(0.0 <= args.hidden_dropout < 1.0, f"--hidden-dropout must be in [0, 1)")
    _check(args.ckpt_format == "torch_dist",
           f"--ckpt-format {args.ckpt_format} is not supported: checkpoints here are Megatron-Core "
           f"distributed checkpoints (torch_dist)")
    if args.finetune or args.use_checkpoint_args:
        _check(args.load is not None, "--finetune and --use-checkpoint-args need --load")
    check_observability_args(args, _check)
    check_megatron_flags(args, lambda message: _check(False, message))
    check_scaling_args(args, _check)
    _check(args.clip_grad >= 0.0, f"--clip-grad must be >= 0, got {args.clip_grad}")
    _check(args.weight_decay >= 0.0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    low, high = args.long_term_delay_range
    _check(1 <= low <= high, f"--long-term-delay-range LOW HIGH needs 1 <= LOW <= HIGH, got {low} {high}")
    _check(args.short_term_window >= 1, "--short-term-window must be >= 1")
    if args.save_interval is not None:
        _check(args.save is not None, "--save-interval needs --save")
        _check(args.save_interval >= 1, "--save-interval must be >= 1")
    _check(args.async_save is False or args.save is not None, "--async-save needs --save")
    _check(args.distributed_timeout_minutes > 0,
           f"--distributed-timeout-minutes must be > 0, got {args.distributed_timeout_minutes}")
    if args.exit_signal_handler or args.exit_duration_in_mins or args.exit_interval:
        pass  # exiting early without --save is allowed (nothing is saved, a warning is logged)
    _check(args.eval_iters >= 0, "--eval-iters must be >= 0")
    if not args.mock_data:
        _check(bool(args.data_path) or bool(args.train_data_path),
               "--data-path (or --train-data-path) is required, or --mock-data for synthetic tokens")
        _check(not (args.data_path and (args.train_data_path or args.valid_data_path
                                        or args.test_data_path)),
               "--data-path cannot be combined with --train-data-path/--valid-data-path/--test-data-path")
        _check(args.tokenizer_type is not None, "--tokenizer-type is required with --data-path")
    else:
        _check(args.vocab_size is not None or args.tokenizer_type is not None,
               "--mock-data needs --vocab-size (or a --tokenizer-type)")
    _check_tokenizer_args(args)
    _check_fp8_and_te(args)
    return args


# What --use-checkpoint-args takes from the checkpoint (Megatron-LM's load_args_from_checkpoint
# takes the model shape and the tokenizer; the parallel layout stays the command line's).
CHECKPOINT_MODEL_ARGS = (
    "model", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
    "disable_bias_linear", "persistent_memory_size", "short_term_window", "long_term_delay_range",
    "long_term_inference_delay", "bandwidth_theta_init", "bandwidth_alpha_init", "document_masking",
    "v1_key_scale_max", "tokenizer_type", "tokenizer_model", "vocab_file", "merge_file",
    "vocab_size", "eod_token", "make_vocab_size_divisible_by",
)


def _use_checkpoint_args(args: argparse.Namespace) -> None:
    _check(args.load is not None, "--use-checkpoint-args needs --load")
    from megatron_mosaic.training.checkpoint_state import read_checkpoint_args

    try:
        saved = read_checkpoint_args(args.load)
    except (FileNotFoundError, ValueError) as err:
        raise ArgumentError(f"--use-checkpoint-args: {err}") from None
    for key in CHECKPOINT_MODEL_ARGS:
        if key in saved:
            setattr(args, key, tuple(saved[key]) if key == "long_term_delay_range" else saved[key])


def _check_tokenizer_args(args: argparse.Namespace) -> None:
    """Flags that belong to one tokenizer kind; the files themselves are checked when it is built."""
    kind = args.tokenizer_type
    if kind == "NullTokenizer":
        _check(args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size N "
                                            "(token ids are 0..N-1; N is the EOD id)")
        _check(args.vocab_size >= 1, f"--vocab-size must be >= 1, got {args.vocab_size}")
    elif kind is not None:
        # Ignoring it would train a vocabulary other than the one the user named.
        _check(args.vocab_size is None, f"--vocab-size is NullTokenizer's (or --mock-data's without "
                                        f"--tokenizer-type); --tokenizer-type {kind} takes its "
                                        f"vocabulary from its files")
    elif args.vocab_size is not None:
        _check(args.vocab_size >= 1, f"--vocab-size must be >= 1, got {args.vocab_size}")
    if args.eod_token is not None:
        _check(kind == "HuggingFaceTokenizer", "--eod-token applies to --tokenizer-type "
                                               "HuggingFaceTokenizer only")
    if kind is not None:
        _check_tokenizer_builds(args)


def _check_tokenizer_builds(args: argparse.Namespace) -> None:
    """Load the tokenizer once here (last, after the cheap checks), so a missing file or an
    --eod-token outside the vocabulary is one argument error before any process group exists."""
    from megatron_mosaic.data.tokenizers import TokenizerError, build_tokenizer

    try:
        build_tokenizer(args)
    except TokenizerError as err:
        raise ArgumentError(str(err)) from None


def _check_fp8_and_te(args: argparse.Namespace) -> None:
    wants_te = args.transformer_impl == "transformer_engine" or args.fp8_format is not None
    if not wants_te:
        return
    what = (f"--fp8-format {args.fp8_format}" if args.fp8_format
            else "--transformer-impl transformer_engine")
    _check(kind_of(args).transformer_engine,
           f"{what} is implemented for --model mosaic-v1/mosaic-v2; the GPT "
           f"baseline is built from Megatron's local spec only")
    have_te = importlib.util.find_spec("transformer_engine") is not None
    _check(have_te, f"{what} needs NVIDIA Transformer Engine, which is not installed "
                    f"(pip install 'megatron_mosaic[te]' on a CUDA machine)")
    import torch

    _check(torch.cuda.is_available(), f"{what} needs CUDA (Transformer Engine has no CPU kernels)")
    if args.fp8_format:
        _check(args.transformer_impl == "transformer_engine",
               "--fp8-format needs --transformer-impl transformer_engine")
        _check(args.bf16, "--fp8-format needs --bf16")
