"""Scorers against hand-computed answers."""

from __future__ import annotations

import math

import pytest

from megatron_mosaic.evaluation.scoring import AnswerResult, PositionLoss, answer_correct, bin_of, summarize


def result(correct: bool, logprob: float, **fields) -> AnswerResult:
    return AnswerResult("t", 16, fields, correct, logprob, 1)


def test_answer_correct_is_exact_match_of_the_whole_span():
    assert answer_correct([5, 7], [5, 7])
    assert not answer_correct([5, 8], [5, 7])
    assert not answer_correct([5], [5, 7])
    assert not answer_correct([], [])


def test_bins():
    assert [bin_of("distance", d)[1] for d in (1, 2, 3, 4, 7, 8, 100)] == ["1", "2-3", "2-3", "4-7", "4-7",
                                                                           "8-15", "64-127"]
    assert bin_of("query", 0)[1] == "0"
    assert [bin_of("shot", s)[1] for s in (0, 3, 8, 20)] == ["0", "3", "8+", "8+"]
    assert [bin_of("depth", d)[1] for d in (0.0, 0.19, 0.2, 0.99, 1.0)] == [
        "0.0-0.2", "0.0-0.2", "0.2-0.4", "0.8-1.0", "0.8-1.0"]


def test_summarize_groups_by_hand():
    results = [result(True, -0.1, shot=0, distance=1), result(False, -2.0, shot=0, distance=5),
               result(True, -0.3, shot=1, distance=6), result(True, -0.2, shot=9, distance=2),
               result(False, -1.4, shot=12, distance=3)]
    s = summarize(results, ("shot", "distance"))
    assert s["n"] == 5 and s["accuracy"] == pytest.approx(3 / 5)
    assert s["mean_logprob"] == pytest.approx(-4.0 / 5)
    shot = {row["bin"]: (row["n"], row["accuracy"]) for row in s["by"]["shot"]}
    assert shot == {"0": (2, 0.5), "1": (1, 1.0), "8+": (2, 0.5)}
    assert [row["bin"] for row in s["by"]["shot"]] == ["0", "1", "8+"]  # ordered by value
    dist = {row["bin"]: (row["n"], row["accuracy"]) for row in s["by"]["distance"]}
    assert dist == {"1": (1, 1.0), "2-3": (2, 0.5), "4-7": (2, 0.5)}
    assert math.isnan(summarize([], ())["accuracy"])


def test_position_loss_means_and_log_bins_by_hand():
    pl = PositionLoss()
    pl.add([1.0, 2.0, 3.0, 4.0, 5.0])
    pl.add([3.0, 4.0, 5.0])
    assert pl.means() == [2.0, 3.0, 4.0, 4.0, 5.0]
    assert pl.counts == [2, 2, 2, 1, 1]
    bins = pl.binned()
    assert [(b["first"], b["last"], b["tokens"]) for b in bins] == [(1, 1, 2), (2, 3, 4), (4, 5, 2)]
    assert [b["loss"] for b in bins] == pytest.approx([2.0, 14.0 / 4, 9.0 / 2])
