"""Command-line arguments of ``pretrain_mosaic.py``, named as in Megatron-LM where one exists.

``parse_args(argv, world_size)`` parses and validates; every invalid combination is rejected
before any work starts with a message naming the offending arguments. ``args_from_dict`` turns
the argument dict stored in a checkpoint back into a namespace (missing keys take today's
defaults) so a model can be rebuilt from a checkpoint alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Any, Optional, Sequence

# Stdlib-only modules: arguments still parse before torch/megatron are imported.
from megatron_mosaic.training.megatron_flags import add_megatron_flags, check_megatron_flags
from megatron_mosaic.training.model_kinds import KINDS, kind_of
from megatron_mosaic.training.observability_args import (
    add_observability_args,
    check_observability_args,
)
from megatron_mosaic.training.scaling_args import add_scaling_args, check_scaling_args
from megatron_mosaic.training.schedule_args import (
    add_schedule_args,
    check_schedule_args,
    derive_schedule,
    scheduler_steps,
)
from megatron_mosaic.data.tokenizers import (
    EOD_TOKEN_HELP,
    TOKENIZER_TYPE_HELP,
    TOKENIZER_TYPES,
    VOCAB_SIZE_HELP,
)

MODELS = tuple(KINDS)  # ("mosaic-v1", "mosaic-v2", "gpt")
# Megatron-LM's choices; only torch_dist is written and read here (the others are refused by name).
CKPT_FORMATS = ("torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor")


class ArgumentError(ValueError):
    """An invalid argument or combination of arguments (the message names them)."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, default="mosaic-v2")
    # Megatron-LM has no default for the sizes below (they must be given there); a small model
    # here lets `pretrain_mosaic.py --mock-data --vocab-size N` alone run as a smoke test.
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="SwiGLU MLP width (mosaic-v2 and gpt); default 3 * hidden size (paper)")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=None,
                   help="gpt: default 0.1 (Megatron-LM); Mosaic memories have no attention "
                        "probabilities to drop, so 0 is their default and only value")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="no biases in linear layers (mosaic-v1; v2 and gpt never use them)")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="initialise full weights on the CPU then shard them, so any TP size gives "
                        "the same initial model (always on without CUDA)")
    m = p.add_argument_group("mosaic")
    m.add_argument("--persistent-memory-size", type=int, default=0,
                   help="v1 persistent memory slots per head; 0 = round(3.5 * hidden size)")
    m.add_argument("--short-term-window", type=int, default=256)
    m.add_argument("--long-term-delay-range", type=int, nargs=2, default=(64, 256),
                   metavar=("LOW", "HIGH"), help="v2 training delay m ~ U[LOW, HIGH] per step")
    m.add_argument("--long-term-inference-delay", type=int, default=64)
    m.add_argument("--bandwidth-theta-init", type=float, default=1.5)
    m.add_argument("--bandwidth-alpha-init", type=float, default=1.0 / 3.0)
    m.add_argument("--no-document-masking", dest="document_masking", action="store_false",
                   help="let memories see across end-of-document tokens")
    m.add_argument("--v1-key-scale-max", type=float, default=5.0)


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4,
                   help="Megatron-LM requires it; 4 here for the smoke test")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch size * data-parallel size")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute; fp32 main "
                   "parameters in the optimizer and fp32 gradients (Megatron-LM's --bf16)")
    g.add_argument("--fp8-format", choices=("e4m3", "hybrid"), default=None,
                   help="FP8 through Transformer Engine (needs CUDA and transformer-engine)")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local",
                   help="Megatron-LM's default is transformer_engine; local here because Transformer "
                        "Engine needs CUDA and is not installed by default")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="default: nccl with CUDA, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="longest wait for a peer in any collective or store operation: a rank "
                        "whose peer died stops after this at the latest (Megatron-LM)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="prefixes of .bin/.idx files, optionally weighted: [W1] P1 [W2] P2 ...")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of --data-path")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", nargs="*", default=None,
                       help=f"{split} split prefixes (optionally weighted), instead of --data-path")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens instead of --data-path")
    g.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES, help=TOKENIZER_TYPE_HELP)
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or HF tokenizer dir")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt")
    g.add_argument("--eod-token", default=None, metavar="TOKEN", help=EOD_TOKEN_HELP)
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    g.add_argument("--vocab-size", type=int, default=None,
                   help=VOCAB_SIZE_HELP + " Without --tokenizer-type: the vocabulary of --mock-data.")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP size (Megatron-LM)")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="read .bin files instead of memory-mapping them")


def _add_checkpoint_and_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background (megatron-core's asynchronous "
                        "dist-checkpointing): training goes on while the previous one is written")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true",
                   help="save neither the optimizer state nor the learning-rate scheduler")
    g.add_argument("--no-save-rng", action="store_true", help="save no RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="--load the model weights only: no optimizer, scheduler or RNG state, "
                        "iteration and consumed samples start at 0")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model and tokenizer arguments from the --load checkpoint")
    g.add_argument("--ckpt-format", choices=CKPT_FORMATS, default="torch_dist",
                   help="torch_dist only: Megatron-Core distributed checkpoints")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM save a checkpoint and exit cleanly")
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--exit-interval", type=int, default=None)
    e = p.add_argument_group("evaluation and logging")
    e.add_argument("--eval-interval", type=int, default=1000)
    e.add_argument("--eval-iters", type=int, default=100)
    e.add_argument("--per-position-eval-iters", type=int, default=None,
                   help="batches for the final per-position validation loss; default --eval-iters; "
                        "0 skips it")
    e.add_argument("--eval-seq-length", type=int, default=None,
                   help="sequence length of the final per-position validation pass (default "
                        "--seq-length); longer shows in-context learning beyond the training length")
    e.add_argument("--log-interval", type=int, default=100)
    e.add_argument("--tensorboard-dir", default=None)
    e.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_mosaic.py",
        description="Pretrain Memory Mosaics (v1, v2) or a GPT baseline on Megatron-Core.",
        allow_abbrev=False,
    )
    _add_model_args(p)
    _add_training_args(p)
    _add_parallel_args(p)
    _add_data_args(p)
    _add_checkpoint_and_logging_args(p)
    add_schedule_args(p)
    add_observability_args(p)
    add_megatron_flags(p)
    add_scaling_args(p)
    return p


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
    from megatron_mosaic.training.checkpointing import read_checkpoint_args

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


def parse_args(argv: Optional[Sequence[str]] = None, world_size: int = 1) -> argparse.Namespace:
    """Parse and validate. Bad values exit with status 2 and a message naming the arguments."""
    parser = build_parser()
    if not is_first_rank():  # every rank parses; only the first one speaks for all of them
        parser.print_usage = parser.print_help = lambda file=None: None
        parser._print_message = lambda message, file=None: None
        parser.exit = _exit_after_first_rank
    args = parser.parse_args(argv)
    try:
        return validate_args(args, world_size)
    except ArgumentError as err:  # one line naming the arguments (the usage text is 60 lines)
        parser.exit(2, f"{parser.prog}: error: {err}\n")
        raise  # unreachable: parser.exit exits


def _exit_after_first_rank(status: int = 0, message: Optional[str] = None) -> None:
    """A silent rank's exit: torchrun stops the other workers as soon as one exits non-zero, so
    leaving at once could kill rank 0 before it prints the message for everyone."""
    import time

    time.sleep(FIRST_RANK_GRACE_S)
    raise SystemExit(status)


# Parsing needs no torch: rank 0 prints well within this after its own start.
FIRST_RANK_GRACE_S = 5.0


def is_first_rank() -> bool:
    """Rank 0 of a launch (torchrun, SLURM, or a plain single process), before any process group
    exists: the environment's global rank."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def args_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Plain-data form of the arguments for checkpoints (tuples become lists)."""
    out = {}
    for key, value in vars(args).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def args_from_dict(saved: dict[str, Any], **overrides: Any) -> argparse.Namespace:
    """Namespace from checkpointed arguments; keys missing from ``saved`` take current defaults."""
    args = build_parser().parse_args([])
    for key, value in {**saved, **overrides}.items():
        setattr(args, key, value)
    args.long_term_delay_range = tuple(args.long_term_delay_range)
    if args.attention_dropout is None:  # as _derive: the model's default
        args.attention_dropout = kind_of(args).attention_dropout
    return args


def num_microbatches(args: argparse.Namespace) -> int:
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def tokens_per_iteration(args: argparse.Namespace) -> int:
    return args.global_batch_size * args.seq_length

