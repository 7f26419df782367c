"""``pretrain_mosaic.py`` as users run it: torchrun, logs, TensorBoard, plot, SIGTERM, divergence."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys

from megatron_mosaic.training.checkpointing import read_tracker
from tests.training.common import TINY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "pretrain_mosaic.py")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run in its own process group so a hang cannot leave torchrun's workers behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{(out + err)[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_pipeline_parallel_run_reports_everything(tmp_path):
    save, tb = str(tmp_path / "ckpt"), str(tmp_path / "tb")
    argv = TINY + ["--model", "mosaic-v2", "--pipeline-model-parallel-size", "2", "--train-iters", "4",
                   "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
                   "--per-position-eval-iters", "1", "--save", save, "--tensorboard-dir", tb]
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 SCRIPT, *argv])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    line = re.search(r"iteration +4/4 \| consumed samples +32 \| loss [\d.]+ \| lr [\d.e+-]+ \| "
                     r"grad norm [\d.]+ \| tokens/s [\d,]+ \| ms/iter [\d.]+ \| ETA \S+", out)
    assert line, out[-3000:]
    assert re.search(r"validation at iteration 4 \| loss [\d.]+ \| perplexity [\d.]+", out)
    assert f"checkpoint:           {save}" in out and f"per-position loss:    {tb}" in out
    assert read_tracker(save) == 4
    with open(os.path.join(tb, "per_position_loss.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["position"]) for r in rows] == list(range(32))
    assert all(int(r["tokens"]) == 8 for r in rows)  # one global batch of 8 sequences
    assert os.path.getsize(os.path.join(tb, "per_position_loss.png")) > 1000

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "validation/loss", "validation/perplexity"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_run_without_output_directories_writes_nothing_where_it_starts(tmp_path):
    argv = TINY + ["--model", "gpt", "--train-iters", "2", "--eval-iters", "1",
                   "--per-position-eval-iters", "1"]
    proc = _run([sys.executable, SCRIPT, *argv], timeout=120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert os.listdir(tmp_path) == [], out[-3000:]
    assert re.search(r"final \| iteration 2 \| validation loss [\d.]+", out), out[-3000:]
    assert out.count("per-position loss:    not written; with --tensorboard-dir DIR") == 1, out[-3000:]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    save = str(tmp_path / "ckpt")
    argv = TINY + ["--model", "gpt", "--train-iters", "100000", "--log-interval", "1",
                   "--save", save, "--exit-signal-handler"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:  # wait until training is under way
            lines.append(line)
            if re.search(r"iteration +2/100000", line):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    match = re.search(r"exiting at iteration (\d+): received SIGTERM", out)
    assert match, out[-3000:]
    assert read_tracker(save) == int(match.group(1)) >= 2


def test_divergence_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    save = str(tmp_path / "ckpt")
    # An absurd learning rate: the first update wrecks the weights, the next step is not finite.
    argv = TINY + ["--model", "gpt", "--train-iters", "8", "--lr", "1e30", "--min-lr", "0",
                   "--lr-warmup-iters", "0", "--clip-grad", "0", "--save", save,
                   "--save-interval", "1"]
    proc = _run([sys.executable, SCRIPT, *argv])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    match = re.search(r"ERROR: iteration (\d+): (training loss|gradient norm) is (nan|inf)", out)
    assert match, out[-3000:]
    bad = int(match.group(1))
    assert read_tracker(save) == bad - 1
    assert not os.path.exists(os.path.join(save, f"iter_{bad:07d}"))


def test_invalid_arguments_print_one_line_once(tmp_path):
    bad = TINY + ["--model", "gpt", "--num-attention-heads", "3"]
    message = "pretrain_mosaic.py: error: --hidden-size"
    plain = _run([sys.executable, SCRIPT, *bad], timeout=120)
    assert plain.returncode == 2, plain.stdout + plain.stderr
    assert plain.stdout == "" and plain.stderr.count("\n") == 1 and plain.stderr.startswith(message)
    # Two ranks parse the same arguments; only rank 0 prints. torchrun then adds its own
    # summary of the failed workers, which no worker can silence.
    run = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                SCRIPT, *bad], timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode != 0 and out.count(message) == 1, out
    assert "exitcode  : 2" in out
    assert out.count("Traceback (most recent call last)") <= 1, out  # torchrun's, never a worker's
