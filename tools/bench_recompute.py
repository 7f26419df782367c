"""Activation memory saved by --recompute-granularity, measured on one CPU process.

    python tools/bench_recompute.py [--model mosaic-v2] [--num-layers 4] [--hidden-size 256]
        [--num-attention-heads 4] [--seq-length 2048] [--micro-batch-size 1] [--repeats 3]

Builds the model the way pretrain_mosaic.py does (same flags) with no recomputation, with
``selective`` (memories' scans and retrievals) and with ``full`` (uniform, one layer per unit),
runs forward + backward, and prints for each: the activation bytes the forward pass leaves for
backward (``SavedTensorMeter``: every distinct non-parameter storage autograd saved) and the
median forward + backward time. Losses and gradients are the same in all three (see
tests/training/test_recompute.py). Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

MODES = {
    "none": [],
    "selective": ["--recompute-granularity", "selective"],
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
}


def _measure(argv: list[str], repeats: int) -> tuple[int, float]:
    from megatron_mosaic.model.context import micro_batch_context
    from megatron_mosaic.training.activation_memory import SavedTensorMeter
    from megatron_mosaic.training.arguments import parse_args
    from megatron_mosaic.training.model_builder import build_model, pad_vocab_size

    args = parse_args(argv, 1)
    args.padded_vocab_size = pad_vocab_size(args.vocab_size, 1)
    (model,) = build_model(args)
    model.train()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length), generator=gen)
    delay = args.long_term_delay_range[0]
    activation_bytes, times = 0, []
    for _ in range(repeats + 1):  # the first run warms up
        context = micro_batch_context(tokens, delay)
        start = time.perf_counter()
        with SavedTensorMeter(model.parameters()) as meter:
            loss = model(tokens, labels=tokens, packed_seq_params=context).sum()
        loss.backward()
        times.append(time.perf_counter() - start)
        activation_bytes = meter.bytes
        model.zero_grad(set_to_none=True)
    return activation_bytes, statistics.median(times[1:])


def main() -> int:
    from megatron_mosaic.training.initialize import single_rank_megatron
    from megatron_mosaic.training.model_kinds import KINDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mosaic-v2", choices=tuple(KINDS))
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    base = ["--mock-data", "--vocab-size", "256", "--model", opts.model, "--num-layers", str(opts.num_layers),
            "--hidden-size", str(opts.hidden_size), "--num-attention-heads", str(opts.num_attention_heads),
            "--seq-length", str(opts.seq_length), "--micro-batch-size", str(opts.micro_batch_size),
            "--short-term-window", "256", "--long-term-delay-range", "64", "64", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--train-iters", "1"]
    print(f"{opts.model}: {opts.num_layers} layers, d={opts.hidden_size}, H={opts.num_attention_heads}, "
          f"T={opts.seq_length}, B={opts.micro_batch_size}, fp32, 1 CPU process")
    print(f"{'recompute':<10} {'activations (MiB)':>18} {'saved':>7} {'fwd+bwd (s)':>12}")
    results = {}
    for mode, flags in MODES.items():
        with single_rank_megatron(seed=1234):
            results[mode] = _measure(base + flags, opts.repeats)
        held, seconds = results[mode]
        saved = 1.0 - held / results["none"][0]
        print(f"{mode:<10} {held / 2**20:>18.1f} {saved:>7.0%} {seconds:>12.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
