"""tools/evaluate.py under context parallelism equals the single-process scores.

``torchrun --nproc_per_node=2`` (gloo, CP=2) runs the Megatron model's own CP path on tiny v1,
v2 and GPT checkpoints and on a v2 checkpoint trained and saved under CP=2; the single-process
run scores the same checkpoints through the Hugging Face model (merged in memory). Tolerance: accuracies equal; log-likelihoods and losses to 1e-5 relative (fp32
on both sides; only the summation order differs, e.g. the ring's log-sum-exp merge). Length 30
is not a multiple of 2·CP: rows are padded after their end, which a causal model never reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_mosaic.evaluation import TASKS
from tests.evaluation.conftest import MODELS, ROOT, TRAIN_LENGTH
from tools import evaluate

LENGTHS = ("30", str(2 * TRAIN_LENGTH))


def argv_for(load: str, out, text: str) -> list[str]:
    return ["--load", load, "--task", *TASKS, "--seq-length", *LENGTHS, "--num-docs", "2", "--batch-size", "2",
            "--text", text, "--output", str(out)]


def results(out) -> dict[str, dict]:
    return {task: json.loads((out / f"{task}.json").read_text())[0] for task in TASKS}


def test_context_parallel_scores_equal_single_process(tiny_checkpoints, cp_run, small_text, tmp_path):
    assert cp_run["result"].returncode == 0, cp_run["result"].stderr[-3000:]
    loads = {model: tiny_checkpoints[model]["megatron"] for model in MODELS}
    loads["mosaic-v2 saved under CP=2"] = cp_run["checkpoint"]
    runs = {name: argv_for(load, tmp_path / "cp" / name, small_text) for name, load in loads.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "evaluation" / "cp_evaluate.py"), json.dumps(list(runs.values()))]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("wrote ") > 0 and "context parallel over 2 ranks" in proc.stderr
    for model, load in loads.items():
        assert evaluate.main(argv_for(load, tmp_path / "one" / model, small_text)) == 0
        cp, one = results(tmp_path / "cp" / model), results(tmp_path / "one" / model)
        for task, spec in TASKS.items():
            assert cp[task]["context_parallel_size"] == 2 and "context_parallel_size" not in one[task]
            assert cp[task]["parameters"] == one[task]["parameters"]  # the same model, counted alike
            for a, b in zip(cp[task]["lengths"], one[task]["lengths"]):
                assert (a["length"], a["tokens"]) == (b["length"], b["tokens"])
                assert a["mean_loss"] == pytest.approx(b["mean_loss"], rel=1e-5), (model, task)
                assert [p["loss"] for p in a["per_position"]] == pytest.approx(
                    [p["loss"] for p in b["per_position"]], rel=1e-5)
                if spec.grouping:
                    assert a["summary"]["accuracy"] == b["summary"]["accuracy"], (model, task)
                    assert a["summary"]["mean_logprob"] == pytest.approx(b["summary"]["mean_logprob"], rel=1e-5)
                    for field in spec.grouping:
                        got, want = a["summary"]["by"][field], b["summary"]["by"][field]
                        assert [(g["bin"], g["n"], g["accuracy"]) for g in got] == [
                            (w["bin"], w["n"], w["accuracy"]) for w in want]
                        assert [g["mean_logprob"] for g in got] == pytest.approx(
                            [w["mean_logprob"] for w in want], rel=1e-5)


def test_context_parallel_refuses_what_it_cannot_run(tiny_checkpoints, capsys):
    hf = tiny_checkpoints["mosaic-v2"]["hf"]
    assert evaluate.main(["--load", hf, "--task", "recall", "--seq-length", "32", "--context-parallel-size", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs exactly 2 processes (torchrun --nproc_per_node=2), got 1" in err[0], err
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it (this is rank 0)
        assert evaluate.main(["--load", hf, "--task", "recall", "--seq-length", "32"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a Hugging Face directory: context parallelism runs the Megatron model" in err[0], err
