"""``torchrun --max-restarts N`` survives kill -9 of workers, at random iterations and inside
saves, resumes from the last complete checkpoint and ends bit-identical to a run that was never
interrupted; ``--distributed-timeout-minutes`` bounds the wait for a peer that stopped answering.

No environment variable is set for torchrun: the restart safety is the stack's own.
"""

from __future__ import annotations

import glob
import os
import random
import re
import signal
import subprocess
import time

import torch

from tests.faults import procs
from tests.faults.common import MOCK, SCRIPT, read, straight_then_restartable, torchrun

ITERS = 24
ARGS = [*MOCK, "--train-iters", str(ITERS), "--save-interval", "4"]
JOB_TIMEOUT = 600


def checkpoint_tensors(save: str) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(iteration, every tensor of the latest checkpoint -- model and optimizer -- in full,
    the common state) of ``save``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_mosaic.training.checkpointing import checkpoint_dir, read_tracker

    iteration = read_tracker(save)
    path = checkpoint_dir(save, iteration)
    metadata = FileSystemReader(path).read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}
    dcp.load(state, storage_reader=FileSystemReader(path), no_dist=True)
    common = torch.load(os.path.join(path, "common.pt"), weights_only=False)
    return iteration, state, common


def losses(log: str) -> dict[int, str]:
    """Loss printed for each iteration (the last time it was printed: after a restart the
    replayed iterations are printed again)."""
    out = {}
    for match in re.finditer(r"iteration +(\d+)/\d+ \| consumed samples +\d+ \| loss ([\d.]+)", log):
        out[int(match.group(1))] = match.group(2)
    return out


def _starts(log_path: str) -> int:
    text = read(log_path)
    return text.count(" loaded checkpoint from ") + text.count(" starting from scratch")


def _last_iteration(log_path: str) -> int:
    found = re.findall(r"iteration +(\d+)/\d+ \|", read(log_path))
    return int(found[-1]) if found else 0


def test_kill9_restarts_resume_bit_identically(tmp_path):
    seed = int(os.environ.get("FAULT_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    note = f"(FAULT_TEST_SEED={seed})"

    job, straight, save, log, tag, proc = straight_then_restartable(tmp_path, ARGS, "elastic", JOB_TIMEOUT)
    deadline = time.monotonic() + JOB_TIMEOUT
    kills = []

    def wait(condition, what):
        while not condition():
            assert proc.poll() is None, f"job ended before {what} {note}:\n{read(log)[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what} {note}:\n{read(log)[-3000:]}"
            time.sleep(0.005)

    def kill_a_worker(when):
        workers = procs.children_of(proc.pid)
        assert len(workers) == 2, f"{workers} {note}"
        victim = rng.choice(sorted(workers))
        os.kill(victim, signal.SIGKILL)
        kills.append((when, _last_iteration(log)))
        wait(lambda: not os.path.exists(f"/proc/{victim}") or victim not in procs.children_of(proc.pid),
             "the victim to be gone")

    try:
        # 1: at a random iteration of the first attempt (maybe before any checkpoint).
        first = rng.randint(2, 9)
        wait(lambda: _last_iteration(log) >= first, f"iteration {first}")
        kill_a_worker(f"iteration {first}")
        # 2: inside a save of the second attempt.
        wait(lambda: _starts(log) >= 2, "the first restart")
        wait(lambda: bool(glob.glob(os.path.join(save, "iter_*.partial", "*"))), "a save in progress")
        kill_a_worker("inside a save")
        # 3: at a random iteration of the third attempt, past the checkpoint it resumed from.
        wait(lambda: _starts(log) >= 3, "the second restart")
        resumed = _last_iteration(log)
        target = min(ITERS - 1, resumed + rng.randint(1, 4))
        wait(lambda: _last_iteration(log) >= target, f"iteration {target}")
        kill_a_worker(f"iteration {target}")
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"elastic run did not finish {note}:\n{read(log)[-3000:]}") from None
    finally:
        left = procs.reap(proc, tag)
    text = read(log)
    assert proc.returncode == 0, f"kills {kills} {note}:\n{text[-4000:]}"
    assert _starts(log) == 4, f"kills {kills} {note}"
    assert left == [], f"left behind {left} {note}"

    # Bit-identical: every tensor of the final checkpoint (weights and Adam moments), the
    # scheduler and data position, and every iteration's printed loss.
    it_a, tensors_a, common_a = checkpoint_tensors(straight)
    it_b, tensors_b, common_b = checkpoint_tensors(save)
    assert it_a == it_b == ITERS
    assert tensors_a.keys() == tensors_b.keys()
    different = [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])]
    assert different == [], f"kills {kills} {note}: {different[:5]}"
    assert common_a["consumed_samples"] == common_b["consumed_samples"]
    assert losses(job.output) == losses(text), f"kills {kills} {note}"
    assert not glob.glob(os.path.join(save, "*.partial")), os.listdir(save)


def test_timeout_bounds_the_wait_for_a_stopped_peer(tmp_path):
    """A peer that stops answering (SIGSTOP: alive, connections open, nothing sent) is given up
    on after --distributed-timeout-minutes; the job then ends, leaving nothing."""
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "log")
    tag = procs.new_tag()
    proc = procs.start(torchrun(2) + [SCRIPT, *MOCK, "--train-iters", "100000", "--save", save,
                                      "--save-interval", "50", "--distributed-timeout-minutes", "0.25"],
                       tag, log)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while _last_iteration(log) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, read(log)[-3000:]
            time.sleep(0.05)
        workers = sorted(procs.children_of(proc.pid))
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=15 + 60 + 120)  # the timeout, torchrun's grace period, slack
        waited = time.monotonic() - stopped
    finally:
        left = procs.reap(proc, tag)
    text = read(log)
    assert proc.returncode != 0
    assert waited >= 10, f"gave up after {waited:.0f} s, before the timeout"
    errors = [line for line in text.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "--distributed-timeout-minutes 0.25" in errors[0], text[-3000:]
    assert left == [], left
