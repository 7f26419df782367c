"""Training throughput of the quickstart's runs under environment variants, A/B in alternation.

    python tools/bench_training.py [--iters 100] [--rounds 3]
        --variant NAME=[VAR=VALUE[,VAR=VALUE...]] --variant ...

Runs ``examples/quickstart.sh`` with QUICKSTART_TRAIN_ONLY=1 (the quickstart's exact training of
Mosaic v2 and the GPT baseline, 2 processes, pipeline parallel; its data must exist: run
``make quickstart`` once) for each variant in turn, ``--rounds`` times, so load changes on a
shared machine hit every variant alike. Prints each run's mean training tokens/s (the ``final``
line of its log), the median per model and variant, and each variant's ratio to the first.
For example, the quickstart's malloc thresholds against glibc's defaults:
``--variant glibc=QUICKSTART_MALLOC=0 --variant thresholds=``.
Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir))
MODELS = ("mosaic-v2", "gpt")
FINAL = re.compile(r"final \| iteration \d+ .*training tokens/s ([\d,]+)")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """NAME=VAR=VALUE[,VAR=VALUE...] (NAME= alone: the environment as it is)."""
    name, _, assignments = text.partition("=")
    env = {}
    for item in filter(None, assignments.split(",")):
        var, sep, value = item.partition("=")
        if not sep or not var:
            raise argparse.ArgumentTypeError(f"expected NAME=VAR=VALUE[,VAR=VALUE...], got {text!r}")
        env[var] = value
    if not name:
        raise argparse.ArgumentTypeError(f"a variant needs a name: {text!r}")
    return name, env


def run_once(env: dict[str, str], iters: int, runs: str) -> dict[str, float]:
    """One quickstart training of both models; mean tokens/s per model."""
    full = {**os.environ, **env, "QUICKSTART_ITERS": str(iters), "QUICKSTART_RUNS": runs,
            "QUICKSTART_TRAIN_ONLY": "1"}
    done = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh")], env=full,
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = " / ".join(done.stdout.strip().splitlines()[-3:] + done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"examples/quickstart.sh failed (exit {done.returncode}): {tail}")
    speeds = {}
    for model in MODELS:
        with open(os.path.join(runs, model, "train.log"), encoding="utf-8") as log:
            found = FINAL.findall(log.read())
        if not found:
            raise RuntimeError(f"{runs}/{model}/train.log has no 'final' line with training tokens/s")
        speeds[model] = float(found[-1].replace(",", ""))
    return speeds


def main() -> int:
    from tools._cli import cli_error, positive_int

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=positive_int, default=100, help="training iterations per run")
    parser.add_argument("--rounds", type=positive_int, default=3, help="runs of every variant, alternated")
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="NAME=VAR=VALUE[,VAR=VALUE...] (NAME= : the environment as it is); give two "
                             "or more, the first is the baseline of the ratios")
    args = parser.parse_args()
    variants = dict(args.variant)
    if len(variants) < 2:
        parser.error("give at least two --variant with different names")
    if not os.path.exists(os.path.join(ROOT, "data", "shakespeare", "train_text_document.idx")):
        parser.error("data/shakespeare is not prepared: run `make quickstart` once")
    results = {(name, model): [] for name in variants for model in MODELS}
    with tempfile.TemporaryDirectory(prefix="bench_training_") as scratch:
        for round_ in range(1, args.rounds + 1):
            for name, env in variants.items():
                try:
                    speeds = run_once(env, args.iters, os.path.join(scratch, name))
                except RuntimeError as err:
                    return cli_error("bench_training", err)
                for model, value in speeds.items():
                    results[name, model].append(value)
                print(f"round {round_}/{args.rounds} {name:<10} "
                      + "  ".join(f"{m} {v:,.0f} tokens/s" for m, v in speeds.items()), flush=True)
    base = next(iter(variants))
    print(f"\nmedian tokens/s over {args.rounds} rounds of {args.iters} iterations (ratio to {base}):")
    for model in MODELS:
        ref = statistics.median(results[base, model])
        print(f"  {model:<10} " + "  ".join(
            f"{name} {statistics.median(results[name, model]):,.0f} ({statistics.median(results[name, model]) / ref:.2f})"
            for name in variants))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make the repository importable
        sys.path.insert(0, ROOT)
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "bench_training"))
