"""Time forward + backward of one-layer Mosaic v2, Mosaic v1 and GPT-baseline models on the CPU.

    python tools/bench_layers.py [--repeats 10] [--threads 1] [--profile]

Each model has one layer and a small vocabulary (256) so the layer dominates. Shapes: the
quickstart micro-batch (B=2, T=256, d=128, H=4, SwiGLU 3d, window 64, delay 32) and a long one
(B=1, T=2048, d=256, H=4, window 256, delay 128), each with one document per row ("single") and
with EOD-packed documents ("packed", document masking on). Times are medians of interleaved runs
measured in this process; the ratio is to the GPT baseline of the same row. Not a test.
``--profile`` prints the torch.profiler table of the v2 model at the quickstart shape (packed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_mosaic.model import MosaicConfig, MosaicModel, build_gpt_baseline, gpt_baseline_config
from megatron_mosaic.training.initialize import single_rank_megatron

VOCAB, EOD = 256, 3
SHAPES = {  # name: (B, T, d, H, window, delay)
    "quickstart": (2, 256, 128, 4, 64, 32),
    "long": (1, 2048, 256, 4, 256, 128),
}


def build(kind: str, d: int, heads: int, window: int, delay: int) -> torch.nn.Module:
    common = dict(num_layers=1, hidden_size=d, num_attention_heads=heads, use_cpu_initialization=True)
    torch.manual_seed(0)
    if kind == "gpt":
        return build_gpt_baseline(gpt_baseline_config(ffn_hidden_size=3 * d, **common), VOCAB, eod_token_id=EOD)
    if kind == "v1":
        config = MosaicConfig(mosaic_version=1, persistent_memory_size=int(3.5 * d), **common)
    else:
        config = MosaicConfig(mosaic_version=2, ffn_hidden_size=3 * d, short_term_window=window,
                              long_term_delay_range=(delay, delay), **common)
    return MosaicModel(config, VOCAB, eod_token_id=EOD)


def tokens_for(B: int, T: int, packed: bool) -> torch.Tensor:
    tokens = torch.randint(EOD + 1, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    if packed:  # documents of 37..300 tokens
        g = torch.Generator().manual_seed(1)
        for b in range(B):
            t = int(torch.randint(37, 300, (1,), generator=g))
            while t < T:
                tokens[b, t] = EOD
                t += int(torch.randint(37, 300, (1,), generator=g))
    return tokens


def step(model: torch.nn.Module, tokens: torch.Tensor, delay: int) -> None:
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels=tokens.roll(-1, 1), long_term_delay=delay)
    loss.mean().backward()


def bench_shape(name: str, packed: bool, repeats: int) -> dict[str, float]:
    B, T, d, H, window, delay = SHAPES[name]
    models = {k: build(k, d, H, window, delay) for k in ("gpt", "v1", "v2")}
    tokens = tokens_for(B, T, packed)
    times: dict[str, list[float]] = {k: [] for k in models}
    for k, m in models.items():  # warm-up
        step(m, tokens, delay)
    for _ in range(repeats):  # interleaved so load changes hit every model alike
        for k, m in models.items():
            start = time.perf_counter()
            step(m, tokens, delay)
            times[k].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def profile_v2(rows: int) -> None:
    B, T, d, H, window, delay = SHAPES["quickstart"]
    model = build("v2", d, H, window, delay)
    tokens = tokens_for(B, T, packed=True)
    step(model, tokens, delay)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step(model, tokens, delay)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with single_rank_megatron():
        if args.profile:
            profile_v2(args.rows)
            return
        print(f"{'shape':<11} {'docs':<7} {'gpt ms':>8} {'v1 ms':>8} {'v2 ms':>8} {'v1/gpt':>7} {'v2/gpt':>7}")
        for name in args.shapes:
            for packed in (False, True):
                r = bench_shape(name, packed, args.repeats)
                print(f"{name:<11} {'packed' if packed else 'single':<7} {r['gpt']:8.1f} {r['v1']:8.1f} "
                      f"{r['v2']:8.1f} {r['v1'] / r['gpt']:7.2f} {r['v2'] / r['gpt']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
