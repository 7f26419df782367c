#!/usr/bin/env python
"""Measure tools/preprocess_data.py throughput (MB/s of raw input) for several --workers values.

    python tools/benchmark_preprocess.py --input data/shakespeare/train.jsonl \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/shakespeare/tokenizer.model \
        --workers 1 2 --repeat 3

Each run writes to a temporary directory. Prints a markdown table with the best of --repeat runs:
"pipeline" is the tokenize+write phase the tool itself reports; "call" also counts tokenizer
loading and worker start-up (not the Python interpreter's own start-up); "CPU s" is the CPU time
of the whole call, main process plus workers (independent of other load on the machine).
"""

import argparse
import os
import resource
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megatron_mosaic.data import preprocess  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the pool workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main() -> int:
    from tools._cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=positive_int, default=3)
    ours, rest = parser.parse_known_args()
    best = {w: {"pipeline": 0.0, "call": 0.0, "cpu": float("inf")} for w in ours.workers}
    # Alternate the worker counts so that changes in machine load hit them alike.
    for _ in range(ours.repeat):
        for workers in ours.workers:
            with tempfile.TemporaryDirectory() as tmp:
                args = preprocess.get_parser().parse_args(
                    rest + ["--output-prefix", os.path.join(tmp, "bench"), "--workers", str(workers),
                            "--log-interval", str(10**9)])
                cpu0 = _cpu_seconds()
                start = time.perf_counter()
                stats = preprocess.preprocess(args, log=lambda *_: None)
                call = time.perf_counter() - start
                cpu = _cpu_seconds() - cpu0
            b = best[workers]
            b["pipeline"] = max(b["pipeline"], stats.mb_per_s)
            b["call"] = max(b["call"], stats.input_bytes / 1e6 / call)
            b["cpu"] = min(b["cpu"], cpu)
    rows = [(w, stats.documents, stats.input_bytes / 1e6, b["pipeline"], b["call"], b["cpu"])
            for w, b in best.items()]
    print(f"cpu cores: {os.cpu_count()}, load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| --workers | documents | MB | pipeline MB/s | call MB/s | CPU s |")
    print("|---|---|---|---|---|---|")
    for workers, docs, mb, pipeline, call, cpu in rows:
        print(f"| {workers} | {docs} | {mb:.2f} | {pipeline:.2f} | {call:.2f} | {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "benchmark_preprocess"))
