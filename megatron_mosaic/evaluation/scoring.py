"""Scoring answers and aggregating them (pure Python: no model, no torch).

An answer is correct when the argmax prediction at every one of its tokens is that token
(exact match of the whole span); its log-likelihood is the sum of its tokens' log-probabilities.
Aggregates are accuracies overall and grouped by an answer field, in bins that keep the
figures readable: log2 bins for distances and query indices, fifths for depth, single shots up
to 8 (then 8+).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

MAX_SHOT_BIN = 8
DEPTH_BINS = 5


@dataclass
class AnswerResult:
    task: str
    length: int  # the document's length in tokens
    fields: dict  # the answer's grouping fields (query, distance, shot, depth, ...)
    correct: bool
    logprob: float
    num_tokens: int


def answer_correct(predicted: Sequence[int], target: Sequence[int]) -> bool:
    """Exact match of the argmax predictions with the answer tokens (an empty answer is wrong)."""
    return len(target) > 0 and len(predicted) == len(target) and all(
        int(p) == int(t) for p, t in zip(predicted, target))


def _log2_bin(value: int) -> tuple[float, str]:
    if value <= 0:
        return 0, "0"
    low = 1 << int(math.log2(value))
    return low, str(low) if low == 1 else f"{low}-{2 * low - 1}"


def bin_of(field: str, value) -> tuple[float, str]:
    """(sort key, label) of the bin that ``value`` of ``field`` falls in."""
    if field == "shot":
        shot = int(value)
        return (shot, str(shot)) if shot < MAX_SHOT_BIN else (MAX_SHOT_BIN, f"{MAX_SHOT_BIN}+")
    if field == "depth":
        index = min(int(float(value) * DEPTH_BINS), DEPTH_BINS - 1)
        return index / DEPTH_BINS, f"{index / DEPTH_BINS:.1f}-{(index + 1) / DEPTH_BINS:.1f}"
    return _log2_bin(int(value))


def _stats(results: Sequence[AnswerResult]) -> dict:
    n = len(results)
    return {"n": n,
            "accuracy": sum(r.correct for r in results) / n if n else float("nan"),
            "mean_logprob": sum(r.logprob for r in results) / n if n else float("nan")}


def group_accuracy(results: Iterable[AnswerResult], field: str) -> list[dict]:
    """Accuracy and mean log-likelihood per bin of ``field``, bins in increasing order."""
    groups: dict[tuple[float, str], list[AnswerResult]] = {}
    for r in results:
        if field in r.fields:
            groups.setdefault(bin_of(field, r.fields[field]), []).append(r)
    return [{"bin": label, "order": order, **_stats(members)}
            for (order, label), members in sorted(groups.items())]


def summarize(results: Sequence[AnswerResult], grouping: Sequence[str]) -> dict:
    """Overall accuracy / mean log-likelihood and the grouped tables."""
    return {**_stats(results), "by": {field: group_accuracy(results, field) for field in grouping}}


class PositionLoss:
    """Loss per token position, summed over documents (rows may differ in length)."""

    def __init__(self) -> None:
        self.sums: list[float] = []
        self.counts: list[int] = []

    def add(self, losses: Sequence[float]) -> None:
        for position, loss in enumerate(losses):
            if position == len(self.sums):
                self.sums.append(0.0)
                self.counts.append(0)
            self.sums[position] += float(loss)
            self.counts[position] += 1

    def means(self) -> list[float]:
        return [s / c for s, c in zip(self.sums, self.counts)]

    def binned(self) -> list[dict]:
        """Token-weighted means over positions 1, 2-3, 4-7, ... (1-based): a readable curve
        from per-position means that are noisy over a few documents."""
        out, low = [], 1
        while low <= len(self.sums):
            high = min(2 * low - 1, len(self.sums))
            count = sum(self.counts[low - 1:high])
            out.append({"first": low, "last": high, "tokens": count,
                        "loss": sum(self.sums[low - 1:high]) / count})
            low *= 2
        return out
