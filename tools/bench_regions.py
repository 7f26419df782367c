"""What each region of a Mosaic v2 layer costs where it runs: the layer timed with one region
replaced by a stand-in of the same shapes, against the whole layer and the GPT layer.

    python tools/bench_regions.py [--repeats 40] [--threads 1] [--shapes quickstart long]

The regions: the key scan (both memories' gated scan), the value features (peek, norm and
scale) and the two recalls (the retrievals with their blocking, masks and padding). Each
stand-in is one elementwise op on the same tensors (keys x·e^(g+a) instead of the scan, the
per-head values times their mix, q·k + v instead of a recall), so the rest of the layer runs
and backpropagates unchanged and the time saved is what the region costs in place, cache
effects and all, minus one cheap op. "t/f if free" is the v2 layer's time per FLOP relative to
the GPT layer's (tools/bench_layers.py's t/f; the goal is 1.15) with that region costing
nothing. Shapes and models as in bench_layers (one layer, decoder only, masks rebuilt every
step); medians of interleaved runs in one process. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable

import torch

from megatron_mosaic.training.initialize import single_rank_megatron


def _scan(raw, log_decay, log_gain=None, resets=None, group=None):
    return raw * (log_gain + log_decay).exp(), None, None


def _values(projected, extractors, context, dtype):
    from megatron_mosaic.model.module import split_heads

    mix = torch.cat([e.mix for e in extractors]).view(1, -1, 1, 1)
    return (split_heads(projected, mix.shape[1]).float() * mix).to(dtype)


def _recall(queries, keys, values, visibility, context):
    return queries * keys + values


# region: (module, attribute, stand-in); the layers look these names up at call time
REGIONS = {
    "scan": ("megatron_mosaic.model.extractors", "linear_recurrence", _scan),
    "values": ("megatron_mosaic.model.extractors", "value_features", _values),
    "recall": ("megatron_mosaic.model.memories", "recall", _recall),
}


@contextlib.contextmanager
def replaced(region: str):
    """The v2 layer with ``region`` replaced by its stand-in, for the duration."""
    module_name, name, stand_in = REGIONS[region]
    module = sys.modules[module_name]
    original = getattr(module, name)
    setattr(module, name, stand_in)
    try:
        yield
    finally:
        setattr(module, name, original)


def _without(step: Callable[[], None], region: str) -> Callable[[], None]:
    def run() -> None:
        with replaced(region):
            step()
    return run


def bench_shape(name: str, packed: bool, repeats: int) -> tuple[dict[str, float], float]:
    """(median ms per step of gpt, v2 and v2 without each region; v2's FLOP ratio to gpt)."""
    from tools.bench_layers import SHAPES
    from tools.layer_benchmark import build, layer_flops, layer_step, time_steps, tokens_for

    B, T, d, H, window, delay = SHAPES[name]
    tokens = tokens_for(B, T, packed)
    models = {k: build(k, d, H, window, delay) for k in ("gpt", "v2")}
    steps = {k: layer_step(m, tokens, delay, bf16=False) for k, m in models.items()}
    steps.update({f"v2-{region}": _without(steps["v2"], region) for region in REGIONS})
    seconds = time_steps(steps, tokens.device, repeats)
    flops = {k: layer_flops(m, k, T, window, delay) for k, m in models.items()}
    return {k: 1000 * v for k, v in seconds.items()}, flops["v2"] / flops["gpt"]


def main() -> None:
    from tools._cli import positive_int
    from tools.bench_layers import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=40)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--shapes", nargs="+", default=["quickstart"], choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'shape':<11} {'docs':<7} {'gpt ms':>7} {'v2 ms':>7} {'t/f':>5}"
          + "".join(f" {region + ' ms':>10} {'t/f if free':>11}" for region in REGIONS))
    with single_rank_megatron():
        for name in args.shapes:
            for packed in (False, True):
                ms, flop_ratio = bench_shape(name, packed, args.repeats)

                def tf(key: str) -> float:
                    return ms[key] / ms["gpt"] / flop_ratio
                print(f"{name:<11} {'packed' if packed else 'single':<7} {ms['gpt']:7.1f} {ms['v2']:7.1f} "
                      f"{tf('v2'):5.2f}" + "".join(f" {ms['v2'] - ms['v2-' + r]:10.2f} {tf('v2-' + r):11.2f}"
                                                  for r in REGIONS), flush=True)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repository importable
        sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "bench_regions"))
