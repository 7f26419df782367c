"""The ``pretrain_mosaic.py`` argument parser: every flag, its default and its help, named as in
Megatron-LM where one exists.

``build_parser()`` holds the model, training, parallelism, data, checkpointing and logging
groups defined here, and the groups of ``schedule_args``, ``observability_args``,
``megatron_flags`` and ``scaling_args``. It only parses; ``argument_checks`` derives and checks.
"""

from __future__ import annotations

import argparse

# Stdlib-only modules: arguments still parse before torch/megatron are imported.
from megatron_mosaic.training.megatron_flags import add_megatron_flags
from megatron_mosaic.training.model_kinds import KINDS
from megatron_mosaic.training.observability_args import add_observability_args
from megatron_mosaic.training.scaling_args import add_scaling_args
from megatron_mosaic.training.schedule_args import add_schedule_args
from megatron_mosaic.data.tokenizers import (
    EOD_TOKEN_HELP,
    TOKENIZER_TYPE_HELP,
    TOKENIZER_TYPES,
    VOCAB_SIZE_HELP,
)

MODELS = tuple(KINDS)  # ("mosaic-v1", "mosaic-v2", "gpt")
# Megatron-LM's choices; only torch_dist is written and read here (the others are refused by name).
CKPT_FORMATS = ("torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor")


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
