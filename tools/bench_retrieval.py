"""Time the retrieval kernels against each other on one device and print which one to default to.

    python tools/bench_retrieval.py [--device cuda] [--lengths 4096 16384 32768] [--repeats 10]

For each length, packed documents (37..300 tokens, the document-masked case that needs more than
a causal shift) under v2's two rules (short-term window 256, long-term delay 64), fp32 queries
with bandwidths up to 30: associative_recall with backend="sdpa" (banded / masked SDPA) and
backend="flex" (FlexAttention block masks), forward + backward where the device has a
FlexAttention backward, forward only elsewhere. Medians of interleaved runs in this process;
the pick is the faster backend summed over the rows, to write into
megatron_mosaic.memory.retrieval.RECALL_BACKEND for that device type. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

from megatron_mosaic.memory import SequenceLayout, Visibility, associative_recall
from megatron_mosaic.memory.flex import flex_supported

RULES = {"short (window 256)": Visibility(delay=1, window=256), "long (delay 64)": Visibility(delay=64)}


def _inputs(T: int, heads: int, dim: int, device: torch.device, grad: bool):
    gen = torch.Generator().manual_seed(T)
    keys = torch.nn.functional.normalize(torch.randn(1, heads, T, dim, generator=gen), dim=-1)
    queries = keys * (1 + 29 * torch.rand(1, heads, T, 1, generator=gen))
    values = torch.randn(1, heads, T, dim, generator=gen)
    tokens = torch.ones(1, T, dtype=torch.long)
    hi = max(8, min(300, T // 3))  # 37..300 tokens; shorter on small dry-run lengths, so
    t, lo = 0, max(4, hi // 8)     # every length has several documents
    while t < T:
        t += int(torch.randint(lo, hi, (1,), generator=gen))
        if t < T:
            tokens[0, t] = 0
    layout = SequenceLayout.from_tokens(tokens, 0).to(device)
    return [x.to(device).requires_grad_(grad) for x in (queries, keys, values)], layout


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(backend: str, inputs, layout, rule, grad: bool) -> float:
    _sync(inputs[0].device)
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        y = associative_recall(*inputs, rule, layout, layout, backend=backend)
        if grad:
            y.sum().backward()
    _sync(inputs[0].device)
    return time.perf_counter() - start


def compare(device: torch.device, lengths: list[int], repeats: int, heads: int = 16, dim: int = 128,
            out_of_time: Callable[[], bool] = lambda: False) -> str:
    """Print the table; return the faster backend for this device (sdpa without FlexAttention).
    Rows left when ``out_of_time()`` turns true are listed as skipped; the pick is then over the
    rows that ran."""
    grad = flex_supported(device, needs_grad=True)
    if not flex_supported(device, needs_grad=False):
        print("    FlexAttention is not importable here: sdpa")
        return "sdpa"
    print(f"    retrieval, H={heads} D={dim}, packed documents, {'fwd+bwd' if grad else 'forward only (no FlexAttention backward here)'}")
    print(f"    {'T':>6} {'rule':<20} {'sdpa ms':>9} {'flex ms':>9} {'flex/sdpa':>9}")
    totals = {"sdpa": 0.0, "flex": 0.0}
    for T in lengths:
        for name, rule in RULES.items():
            if out_of_time():
                print(f"    {T:>6} {name:<20} SKIP (time budget spent)", flush=True)
                continue
            inputs, layout = _inputs(T, heads, dim, device, grad)
            times: dict[str, list[float]] = {"sdpa": [], "flex": []}
            for backend in times:  # warm-up: compilation, block masks
                _once(backend, inputs, layout, rule, grad)
            for _ in range(repeats):
                for backend in times:
                    times[backend].append(_once(backend, inputs, layout, rule, grad))
            ms = {b: 1000 * statistics.median(v) for b, v in times.items()}
            for b in totals:
                totals[b] += ms[b]
            print(f"    {T:>6} {name:<20} {ms['sdpa']:9.2f} {ms['flex']:9.2f} {ms['flex'] / ms['sdpa']:9.2f}", flush=True)
    if not any(totals.values()):
        print(f"    pick for {device.type}: none (no row ran)")
        return "sdpa"
    pick = min(totals, key=totals.get) if grad else "sdpa"  # training needs the backward
    print(f"    pick for {device.type}: {pick}")
    return pick


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    compare(torch.device(args.device), args.lengths, args.repeats, args.heads, args.dim)
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repository importable
        sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
    sys.exit(main())
