"""Flags that make large models fit (Megatron-LM names): activation recomputation, sequence
parallelism, the distributed optimizer. Stdlib only: parsed before torch is imported."""

from __future__ import annotations

import argparse
from typing import Callable


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory savings (activation recomputation, sequence parallelism, "
                             "distributed optimizer)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="full: recompute whole layers in backward (with --recompute-method); "
                        "selective: recompute each memory's scans and retrieval (the "
                        "baseline's core attention), keeping the projections")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None,
                   help="full recompute: uniform = checkpoint every --recompute-num-layers "
                        "layers as one unit; block = recompute only the first "
                        "--recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="with TP > 1: shard norms, residuals and dropout along the sequence")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Megatron's DistributedOptimizer: Adam state sharded over data parallelism "
                        "(checkpoints: fully reshardable, load at any DP/TP/PP)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="start each gradient bucket's all-reduce / reduce-scatter during backward")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: all-gather each bucket's updated "
                        "parameters during the next forward, just before they are used")


def check_scaling_args(args: argparse.Namespace, check: Callable[[bool, str], None]) -> None:
    """Megatron-LM's rules for the recompute flags, checked before anything is built."""
    granularity, method, layers = (args.recompute_granularity, args.recompute_method,
                                   args.recompute_num_layers)
    if granularity == "full":
        check(method is not None, "--recompute-granularity full needs --recompute-method uniform|block")
        check(layers is not None and layers >= 1, "--recompute-granularity full needs "
                                                  "--recompute-num-layers >= 1")
        per_stage = args.num_layers // args.pipeline_model_parallel_size
        check(method != "uniform" or layers is None or per_stage % layers == 0,
              f"--recompute-method uniform: --recompute-num-layers ({layers}) must divide the "
              f"layers per pipeline stage ({per_stage})")
    else:
        check(method is None and layers is None,
              "--recompute-method/--recompute-num-layers need --recompute-granularity full")
    check(not args.overlap_param_gather or args.use_distributed_optimizer,
          "--overlap-param-gather needs --use-distributed-optimizer (it overlaps that optimizer's "
          "parameter all-gather with the next forward)")
    check(not args.sequence_parallel or args.tensor_model_parallel_size > 1,
          "--sequence-parallel needs --tensor-model-parallel-size > 1")
