"""Time the memory math's fast paths against naive implementations, in one process.

    python tools/bench_memory.py [--lengths 512 1024 2048 4096] [--batch 1 --heads 4 --dim 32]

Retrieval: associative_recall (shifted causal SDPA, no mask) vs a naive fp32 T×T masked softmax.
Scan: linear_recurrence (chunked log-space scan) vs a per-step Python loop over t.
Each time is the median of --repeats runs of forward + backward. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import os
import sys
import statistics
import time

import torch

from megatron_mosaic.memory import Visibility, associative_recall, linear_recurrence


def naive_recall(q, k, v, delay: int, window: int | None):
    T = q.shape[2]
    t = torch.arange(T)
    visible = t[None, :] <= t[:, None] - delay
    if window is not None:
        visible &= t[None, :] >= t[:, None] - window + 1
    scores = (q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> 0
    return probs @ v


def loop_scan(x, log_decay, log_gain):
    h = torch.zeros_like(x[:, :, 0])
    out = []
    for t in range(x.shape[2]):
        h = torch.exp(log_decay[:, :, t]) * h + torch.exp(log_gain[:, :, t]) * x[:, :, t]
        out.append(h)
    return torch.stack(out, dim=2)


def timed(fn, inputs, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # first run is warm-up
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        start = time.perf_counter()
        out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    from tools._cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--dim", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    B, H, D = args.batch, args.heads, args.dim
    print(f"B={B} H={H} D={D} threads={torch.get_num_threads()} (forward+backward, median of {args.repeats})")
    header = f"{'T':>6} {'rule':>16} {'fast ms':>9} {'naive ms':>9} {'naive/fast':>10}"
    print(header)
    for T in args.lengths:
        q, k, v = (torch.nn.functional.normalize(torch.randn(B, H, T, D), dim=-1) * 3 for _ in range(3))
        for delay, window in ((1, None), (1, 256), (64, None)):
            vis = Visibility(delay, window)
            fast = timed(lambda a, b, c: associative_recall(a, b, c, vis), (q, k, v), args.repeats)
            slow = timed(lambda a, b, c: naive_recall(a, b, c, delay, window), (q, k, v), args.repeats)
            print(f"{T:>6} {f'recall d={delay} w={window}':>16} {fast * 1e3:9.1f} {slow * 1e3:9.1f} {slow / fast:10.2f}")
        x = torch.randn(B, H, T, D)
        a = -torch.rand(B, H, T, 1)
        g = torch.randn(B, H, T, 1)
        fast = timed(lambda x_, a_, g_: linear_recurrence(x_, a_, g_), (x, a, g), args.repeats)
        slow = timed(loop_scan, (x, a, g), args.repeats)
        print(f"{T:>6} {'scan (v2 gates)':>16} {fast * 1e3:9.1f} {slow * 1e3:9.1f} {slow / fast:10.2f}")


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repository importable
        sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "bench_memory"))
