"""pretrain_mosaic.py --eval-seq-length: the final per-position pass runs longer than training."""

from __future__ import annotations

import csv

import pytest

from tests.evaluation.conftest import TINY, TRAIN_LENGTH, pretrain

EVAL_LENGTH = 3 * TRAIN_LENGTH  # conftest's cp_run uses the same


def per_position_rows(tb_dir) -> list[dict]:
    with open(tb_dir / "per_position_loss.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("model, nproc, layout", [
    ("mosaic-v2", 1, []),
    ("gpt", 1, []),
    ("mosaic-v1", 2, ["--pipeline-model-parallel-size", "2"]),  # the pipeline's tensor shapes follow
    ("mosaic-v2", 2, ["--context-parallel-size", "2"]),  # long contexts split across CP ranks
])
def test_per_position_pass_runs_at_the_eval_length(model, nproc, layout, tmp_path, request):
    if "--context-parallel-size" in layout:  # the session's CP run (also scored by test_evaluate_cp)
        run = request.getfixturevalue("cp_run")
        result, tb = run["result"], run["tb"]
    else:
        tb = tmp_path / "tb"
        argv = [*TINY, "--model", model, "--eval-seq-length", str(EVAL_LENGTH), "--eval-iters", "1",
                "--per-position-eval-iters", "1", "--tensorboard-dir", str(tb), *layout]
        result = pretrain(argv, nproc)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = per_position_rows(tb)
    assert [int(r["position"]) for r in rows] == list(range(EVAL_LENGTH))
    assert all(int(r["tokens"]) > 0 and float(r["loss"]) > 0 for r in rows)
    # The validation loss is still the training-length pass, reported once.
    assert result.stdout.count("validation at iteration 2") == 1


def test_default_is_the_training_length(tmp_path):
    tb = tmp_path / "tb"
    result = pretrain([*TINY, "--model", "mosaic-v2", "--per-position-eval-iters", "1", "--tensorboard-dir", str(tb)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(per_position_rows(tb)) == TRAIN_LENGTH


def test_bad_eval_length_is_refused_before_any_work():
    result = pretrain([*TINY, "--model", "mosaic-v2", "--eval-seq-length", "0"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "pretrain_mosaic.py: error: --eval-seq-length (0) must be >= 1"
