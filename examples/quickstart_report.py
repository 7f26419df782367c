"""Summarise the quickstart: unigram baselines of the data and what each model reached.

    python examples/quickstart_report.py --train PREFIX --valid PREFIX --run NAME=LOG [--run ...]

The unigram baselines are what a model that ignores context scores: the entropy of the training
set's token distribution, and the cross-entropy of that distribution (add-one smoothed) on the
validation tokens (the fair comparison for a validation loss). LOG is a ``pretrain_mosaic.py``
log; its ``final |`` line gives the validation loss and mean training tokens/s.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

import numpy as np


def token_counts(prefix: str) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    tokens = np.concatenate([data[i] for i in range(len(data))]).astype(np.int64)
    return np.bincount(tokens)


def unigram_baselines(train_prefix: str, valid_prefix: str) -> tuple[float, float]:
    """(entropy of the train unigram distribution, its cross-entropy on valid), in nats."""
    train, valid = token_counts(train_prefix), token_counts(valid_prefix)
    size = max(len(train), len(valid))
    train = np.pad(train, (0, size - len(train))).astype(np.float64)
    valid = np.pad(valid, (0, size - len(valid))).astype(np.float64)
    p = train / train.sum()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    smoothed = (train + 1.0) / (train.sum() + size)
    cross_entropy = float(-(valid * np.log(smoothed)).sum() / valid.sum())
    return entropy, cross_entropy


FINAL = re.compile(r"final \| iteration (\d+) \| validation loss ([\d.]+) \| training tokens/s ([\d,]+)")


def read_final(log_path: str) -> tuple[int, float, float]:
    with open(log_path, encoding="utf-8", errors="replace") as f:
        matches = FINAL.findall(f.read())
    if not matches:
        raise SystemExit(f"{log_path}: no 'final | iteration ... | validation loss ...' line; did "
                         f"the run finish?")
    iteration, loss, tps = matches[-1]
    return int(iteration), float(loss), float(tps.replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training data prefix (.bin/.idx)")
    p.add_argument("--valid", required=True, help="validation data prefix (.bin/.idx)")
    p.add_argument("--run", action="append", default=[], metavar="NAME=LOG")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="also plot every run's per-position validation loss (the per_position_loss.csv "
                        "next to NAME=LOG's tensorboard dir: LOG_DIR/tensorboard/) on one figure")
    args = p.parse_args(argv)
    entropy, cross_entropy = unigram_baselines(args.train, args.valid)
    print(f"unigram entropy of the training tokens:            {entropy:.3f} nats")
    print(f"unigram (train distribution) loss on validation:   {cross_entropy:.3f} nats")
    print(f"{'model':<12} {'iterations':>10} {'val loss':>9} {'val ppl':>9} {'below unigram':>14} "
          f"{'tokens/s':>9}")
    for item in args.run:
        name, _, log = item.partition("=")
        iteration, loss, tps = read_final(log)
        print(f"{name:<12} {iteration:>10d} {loss:>9.3f} {math.exp(loss):>9.1f} "
              f"{cross_entropy - loss:>13.3f}  {tps:>9,.0f}")
    if args.plot:
        plot_runs(args.run, cross_entropy, args.plot)
        print(f"per-position validation loss of every run: {args.plot}")
    return 0


def plot_runs(runs: list[str], unigram: float, out: str) -> None:
    """Log-binned per-position validation loss of each run, with the unigram baseline."""
    import csv
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_mosaic.training.metrics import log_binned

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for item in runs:
        name, _, log = item.partition("=")
        path = os.path.join(os.path.dirname(log), "tensorboard", "per_position_loss.csv")
        with open(path, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        centres, means = log_binned([float(r["loss"]) for r in rows], [float(r["tokens"]) for r in rows])
        ax.plot(centres, means, marker="o", label=name)
    ax.axhline(unigram, color="grey", linestyle="--", label="unigram baseline")
    ax.set_xscale("log")
    ax.set_xlabel("token position in the sequence (1-based, log-spaced bins)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("Validation loss by position: in-context learning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
