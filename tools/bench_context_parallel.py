"""Peak memory and time of one v2 Mosaic layer, forward + backward, with and without CP.

    python tools/bench_context_parallel.py [--lengths 4096 8192 16384 32768] [--cp-sizes 1 2]
        [--hidden-size 128 --heads 2 --window 256 --delay 256 --documents 0]

Each (T, cp) runs in fresh gloo processes (one per CP rank, spawned here): the layer is built
from the same seed on every rank, the [T, 1, d] input is split with ``split_for_context_parallel``
and ``MosaicV2Layer`` runs forward + backward once. "peak MiB" is the rise of the process's
resident-set high-water mark (Linux VmHWM, reset through /proc/self/clear_refs right before the
step) above its resident size at that moment: the memory the step itself needs. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import os
import re
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rank_main(rank: int, cp: int, port: int, out_dir: str, args: argparse.Namespace, length: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore")  # megatron's "no TE/apex" notices, once per rank and config
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=cp)
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from megatron_mosaic.memory import SequenceLayout
    from megatron_mosaic.model import MosaicConfig
    from megatron_mosaic.model.context import MemoryContext
    from megatron_mosaic.model.specs import get_mosaic_layer_local_spec
    from megatron_mosaic.parallel import split_for_context_parallel

    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    torch.manual_seed(0)
    config = MosaicConfig(
        mosaic_version=2, num_layers=1, hidden_size=args.hidden_size, num_attention_heads=args.heads,
        short_term_window=args.window, use_cpu_initialization=True, context_parallel_size=cp,
    )
    layer = build_module(get_mosaic_layer_local_spec(2), config=config, layer_number=1)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(length, 1, args.hidden_size, generator=gen)
    if args.documents > 1:  # EOD-separated documents of equal length
        starts = (torch.arange(length) // (length // args.documents)) * (length // args.documents)
        layout = SequenceLayout(torch.arange(length)[None], starts[None], length)
    else:
        layout = SequenceLayout.contiguous(1, length)
    local_layout, parts = split_for_context_parallel(
        layout, {"hidden": hidden}, cp, parallel_state.get_context_parallel_rank(), seq_dim=0
    )
    x = parts["hidden"].requires_grad_()
    context = MemoryContext(local_layout, args.delay, cp_group=parallel_state.get_context_parallel_group())

    dist.barrier()
    base = _status_mib("VmRSS")
    tracked = _reset_peak()
    start = time.perf_counter()
    out, _ = layer(x, packed_seq_params=context)
    out.float().pow(2).mean().backward()
    elapsed = time.perf_counter() - start
    peak = _status_mib("VmHWM") - base if tracked else float("nan")
    dist.barrier()
    torch.save({"peak": peak, "time": elapsed}, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def run_config(args: argparse.Namespace, length: int, cp: int) -> list[dict]:
    from megatron_mosaic.training.initialize import free_port

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(cp, free_port(), out_dir, args, length), nprocs=cp,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(cp)]


def main() -> None:
    from tools._cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--cp-sizes", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden-size", type=positive_int, default=128)
    parser.add_argument("--heads", type=positive_int, default=2)
    parser.add_argument("--window", type=positive_int, default=256, help="short-term window h")
    parser.add_argument("--delay", type=positive_int, default=256, help="long-term delay m")
    parser.add_argument("--documents", type=positive_int, default=1, help="equal documents per sequence (document masking)")
    parser.add_argument("--threads", type=positive_int, default=1, help="intra-op threads per rank")
    args = parser.parse_args()
    for length in args.lengths:
        for cp in args.cp_sizes:
            if length % (2 * cp):
                parser.error(f"--lengths {length}: must be a multiple of 2 x each --cp-sizes ({2 * cp}), "
                             "the load-balanced split cuts a sequence into 2 x CP equal chunks")
    print(f"one MosaicV2Layer fwd+bwd: d={args.hidden_size} heads={args.heads} h={args.window} m={args.delay} "
          f"documents={args.documents} batch=1 fp32, {args.threads} thread(s) per rank, gloo")
    print(f"| {'T':>6} | {'CP':>2} | {'tokens/rank':>11} | {'peak MiB per rank':>17} | {'MiB per 1k tokens':>17} | {'time s':>7} |")
    print(f"|{'-' * 8}|{'-' * 4}|{'-' * 13}|{'-' * 19}|{'-' * 19}|{'-' * 9}|")
    for length in args.lengths:
        for cp in args.cp_sizes:
            results = run_config(args, length, cp)
            peak = max(r["peak"] for r in results)
            wall = max(r["time"] for r in results)
            per_k = peak / (length / cp / 1024)
            print(f"| {length:>6} | {cp:>2} | {length // cp:>11} | {peak:>17.0f} | {per_k:>17.1f} | {wall:>7.1f} |", flush=True)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repository importable
        sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "bench_context_parallel"))
