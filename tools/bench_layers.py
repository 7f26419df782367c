"""Time forward + backward of one Mosaic v2, Mosaic v1 and GPT-baseline layer on the CPU.

    python tools/bench_layers.py [--repeats 10] [--threads 1] [--compile] [--profile]

Each model has one layer and a small vocabulary (256); what is timed is its decoder alone
(the layer and final norm, forward and backward, on the hidden states, rotary angles and
micro-batch context the model hands it: tools/layer_benchmark.layer_step), so the embedding,
output layer and loss, the same for every kind, do not dilute the ratios. Shapes: the
quickstart micro-batch (B=2, T=256, d=128, H=4, SwiGLU 3d, window 64, delay 32) and a long one
(B=1, T=2048, d=256, H=4, window 256, delay 128), each with one document per row ("single") and
with EOD-packed documents ("packed", document masking on). Times are medians of interleaved runs
measured in this process; the ratios are to the GPT baseline of the same row: time (v/gpt),
analytic training FLOPs of the layer (flop, tools/layer_benchmark.py) and their quotient (t/f:
1.00 = the same time per FLOP as the GPT layer, the FLOP efficiency goal). The micro-batch's
masks are rebuilt on every step, so the one layer pays for them in full, as the first layer of
each micro-batch does; "ops" counts the aten ops of one such step and "ops/l" those a second
layer adds; "t/f/l" is v2's t/f for that second layer (two-layer decoders timed with the rest,
minus the one-layer ones): a deep model's cost per further layer, without the decoder's fixed
part and the micro-batch's masks; a difference of two medians, so noisier than t/f.
``--compile`` adds v1c/v2c columns: the same models with each key/value extractor's features
(scan, key norm, value peek, norm) through torch.compile (inductor; needs gcc on the CPU);
everything else, and the whole GPT baseline, stays eager, since the GPT layer has no such
regions (its norms, SwiGLU and rotary are eager on both sides). Not a test.
``--profile`` prints the torch.profiler table of the v2 layer at the quickstart shape (packed).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from megatron_mosaic.training.initialize import single_rank_megatron

SHAPES = {  # name: (B, T, d, H, window, delay)
    "quickstart": (2, 256, 128, 4, 64, 32),
    "long": (1, 2048, 256, 4, 256, 128),
}


def bench_shape(name: str, packed: bool, repeats: int, compiled: bool = False
                ) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """(median ms per fwd+bwd step, analytic layer FLOPs, aten ops per eager step) per model,
    measured in this process. ``compiled`` adds v1c/v2c: the same seeded v1/v2 with their memory
    feature regions through torch.compile (``compile_memory_features``), timed interleaved with
    the eager models."""
    from tools.layer_benchmark import aten_ops, build, compile_memory_features, layer_flops, time_models, tokens_for

    B, T, d, H, window, delay = SHAPES[name]
    models = {k: build(k, d, H, window, delay) for k in ("gpt", "v1", "v2")}
    # Two-layer decoders, timed with the rest: their difference to the one-layer ones is what a
    # further layer of a deep model costs (the decoder's fixed part and the micro-batch's masks
    # drop out)
    models.update({k + ":2": build(k, d, H, window, delay, layers=2) for k in ("gpt", "v2")})
    if compiled:
        models.update({k + "c": compile_memory_features(build(k, d, H, window, delay)) for k in ("v1", "v2")})
    tokens = tokens_for(B, T, packed)
    seconds = time_models(models, tokens, delay, repeats)
    flops = {k: B * layer_flops(m, k.rstrip("c"), T, window, delay) for k, m in models.items() if ":" not in k}
    ops = {k: aten_ops(models[k], tokens, delay, bf16=False) for k in ("gpt", "v1", "v2")}
    for k in ("gpt", "v2"):  # what a further layer adds
        ops[k + "/layer"] = aten_ops(models[k + ":2"], tokens, delay, bf16=False) - ops[k]
        seconds[k + "/layer"] = seconds.pop(k + ":2") - seconds[k]
    return {k: 1000 * v for k, v in seconds.items()}, flops, ops


def profile_v2(rows: int) -> None:
    from tools.layer_benchmark import build, layer_step, tokens_for

    B, T, d, H, window, delay = SHAPES["quickstart"]
    run = layer_step(build("v2", d, H, window, delay), tokens_for(B, T, packed=True), delay, bf16=False)
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    from tools._cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time v1/v2 with their memory feature regions compiled (v1c, v2c)")
    parser.add_argument("--rows", type=positive_int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with single_rank_megatron():
        if args.profile:
            profile_v2(args.rows)
            return
        extra = ["v1c", "v2c"] if args.compile else []
        print(f"{'shape':<11} {'docs':<7} {'gpt ms':>8} {'v1 ms':>8} {'v2 ms':>8} {'v1/gpt':>7} {'v2/gpt':>7} "
              f"{'v1 flop':>8} {'v2 flop':>8} {'v1 t/f':>7} {'v2 t/f':>7} {'gpt ops':>8} {'v2 ops':>7} "
              f"{'gpt ops/l':>9} {'v2 ops/l':>8} {'v2 t/f/l':>8}"
              + "".join(f" {k + ' ms':>8} {k + ' t/f':>8}" for k in extra))
        for name in args.shapes:
            for packed in (False, True):
                ms, flops, ops = bench_shape(name, packed, args.repeats, args.compile)
                t = {k: ms[k] / ms["gpt"] for k in ms}
                f = {k: flops[k] / flops["gpt"] for k in flops}
                print(f"{name:<11} {'packed' if packed else 'single':<7} {ms['gpt']:8.1f} {ms['v1']:8.1f} "
                      f"{ms['v2']:8.1f} {t['v1']:7.2f} {t['v2']:7.2f} {f['v1']:8.2f} {f['v2']:8.2f} "
                      f"{t['v1'] / f['v1']:7.2f} {t['v2'] / f['v2']:7.2f} {ops['gpt']:8d} {ops['v2']:7d} "
                      f"{ops['gpt/layer']:9d} {ops['v2/layer']:8d} {t['v2/layer'] / t['gpt/layer'] / f['v2']:8.2f}"
                      + "".join(f" {ms[k]:8.1f} {t[k] / f[k]:8.2f}" for k in extra), flush=True)

if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repository importable
        sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "bench_layers"))
