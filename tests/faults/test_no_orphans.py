"""When a job ends, by success, error or signal, no process of it remains.

Every job is tagged through its environment, which all its descendants inherit (orphans too),
so after the launcher has ended the test lists every process still carrying the tag.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import time

import pytest

from tests.faults import procs
from tests.faults.common import MOCK, SCRIPT, read, run_job, torchrun

JOB_TIMEOUT = 240


def _start(tmp_path, *extra):
    save = str(tmp_path / "ckpt")
    tag = procs.new_tag()
    log = str(tmp_path / "log")
    proc = procs.start(torchrun(2) + [SCRIPT, *MOCK, "--train-iters", "100000", "--save", save,
                                      "--save-interval", "2", *extra], tag, log)
    return proc, tag, save, log


def _wait_for(condition, proc, log, timeout=JOB_TIMEOUT, poll=0.005):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early ({proc.returncode}):\n{read(log)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout} s:\n{_stacks(proc, log)}")
        time.sleep(poll)


def _stacks(proc, log) -> str:
    """The log once every worker (and its forked helpers) has printed its threads' stacks
    (pretrain_mosaic.py answers SIGUSR1 so): where a hung job waits."""
    for pid in procs.descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    time.sleep(2)
    return read(log)[-12000:]


def _end_and_list(proc, tag, log) -> list:
    try:
        proc.wait(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        stacks = _stacks(proc, log)
        procs.kill_tagged(tag)
        raise AssertionError(f"the job did not end:\n{stacks}") from None
    left = procs.wait_for_no_processes(tag, timeout=15)
    procs.kill_tagged(tag)
    return left


@contextlib.contextmanager
def _job(tmp_path, *extra):
    """A running job; when the test fails while it runs, it is killed and that failure kept."""
    proc, tag, save, log = _start(tmp_path, *extra)
    try:
        yield proc, save, log
    except BaseException:
        procs.kill_tagged(tag)
        raise
    proc.left = _end_and_list(proc, tag, log)


def _workers(proc) -> list[int]:
    return sorted(procs.children_of(proc.pid))


def _saved(save):
    return lambda: os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))


def _saving(save):
    return lambda: bool(glob.glob(os.path.join(save, "iter_*.partial", "*")))


def _helpers_running(proc):
    """A worker has helper processes (DataLoader workers, checkpoint writers)."""
    return lambda: any(procs.children_of(w) for w in procs.children_of(proc.pid))


def test_success_leaves_nothing(tmp_path):
    job = run_job(torchrun(2) + [SCRIPT, *MOCK, "--train-iters", "4", "--save", str(tmp_path / "ckpt"),
                                 "--save-interval", "2"], str(tmp_path / "log"))
    assert job.returncode == 0, job.output[-3000:]
    assert job.left == [], job.left


@pytest.mark.parametrize("victim", ["rank 0 after a save", "rank 0 inside a save", "rank 1 inside a save",
                                    "rank 0 inside an async save", "rank 1 after an async save"])
def test_worker_killed(tmp_path, victim):
    with _job(tmp_path, *(["--async-save"] if "async" in victim else [])) as (proc, save, log):
        _wait_for(_saved(save), proc, log)
        if "inside" in victim:
            _wait_for(_saving(save), proc, log)
        else:
            _wait_for(_helpers_running(proc), proc, log)
        workers = _workers(proc)
        assert len(workers) == 2, workers
        os.kill(workers[0 if "rank 0" in victim else 1], signal.SIGKILL)
    assert proc.returncode != 0
    assert proc.left == [], f"{victim}: left behind {proc.left}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_launcher_signalled(tmp_path, sig):
    """SIGTERM/SIGINT to torchrun (a scheduler cancelling, Ctrl-C), and SIGKILL of torchrun
    itself, which cannot pass anything on: the workers must notice on their own."""
    with _job(tmp_path) as (proc, save, log):
        _wait_for(_saved(save), proc, log)
        _wait_for(_helpers_running(proc), proc, log)
        proc.send_signal(sig)
    assert proc.left == [], f"{sig.name}: left behind {proc.left}"


def test_user_error_leaves_nothing(tmp_path):
    job = run_job(torchrun(2) + [SCRIPT, *MOCK, "--train-iters", "4", "--load", str(tmp_path / "typo")],
                  str(tmp_path / "log"))
    assert job.returncode != 0 and len(job.errors()) == 1, job.output[-3000:]
    assert job.left == [], job.left
