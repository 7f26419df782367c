"""Shared by the fault tests: tiny runs of ``pretrain_mosaic.py`` as users start them, bounded
in time, in their own session, tagged so that every process they leave can be found."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from tests.faults import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "pretrain_mosaic.py")
PY = sys.executable

# A small model on synthetic data; fast to start and to step on two CPU ranks.
MOCK = [
    "--mock-data", "--vocab-size", "64", "--model", "mosaic-v2",
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--hidden-dropout", "0.1",
    "--short-term-window", "8", "--long-term-delay-range", "2", "6", "--long-term-inference-delay", "4",
    "--log-interval", "1", "--eval-iters", "0", "--per-position-eval-iters", "0", "--no-progress-bar",
    "--num-workers", "1",
]


def torchrun(nproc: int, *extra: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra]


@dataclass
class Job:
    returncode: int
    output: str
    left: list  # (pid, cmdline) of the job's processes still alive after it ended

    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if "ERROR:" in line]


def run_job(cmd: Sequence[str], log_path: str, timeout: float = 240, env: Optional[dict] = None) -> Job:
    """Run ``cmd`` to completion (killed, with all its processes, after ``timeout`` s) and
    report what it printed and which of its processes outlived it."""
    tag = procs.new_tag()
    proc = procs.start(cmd, tag, log_path, extra_env=env)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        procs.kill_tagged(tag)
        proc.wait()
        raise AssertionError(f"timed out after {timeout} s:\n{read(log_path)[-4000:]}") from None
    left = procs.wait_for_no_processes(tag, timeout=15)
    procs.kill_tagged(tag)
    return Job(proc.returncode, read(log_path), left)


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def tracebacks(text: str) -> int:
    """Python tracebacks of the workers (torchrun's own failure summary aside)."""
    return len(re.findall(r"Traceback \(most recent call last\)", text))


def run_distributed_bounded(fn, world_size: int, *args, timeout: float = 300):
    """``tests.distributed.run_distributed`` that gives up after ``timeout`` s: a hang (ranks
    waiting for each other forever, the failure these tests look for) fails the test and its
    rank processes are killed."""
    import signal as _signal

    import multiprocessing.forkserver

    from megatron_mosaic.training.process_guard import children
    from tests.distributed import run_distributed

    # The fork server the ranks start from outlives this run and serves later tests: started
    # first, it is not one of the children this run leaves behind (killed, it would leave every
    # later test unable to start its ranks).
    multiprocessing.forkserver.ensure_running()
    before = set(children())

    def expire(signum, frame):
        raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout} s")

    previous = _signal.signal(_signal.SIGALRM, expire)
    _signal.setitimer(_signal.ITIMER_REAL, timeout)
    try:
        return run_distributed(fn, world_size, *args)
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, previous)
        for pid in set(children()) - before:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def straight_then_restartable(tmp_path, args: Sequence[str], name: str, timeout: float, *extra: str):
    """The uninterrupted reference run (saved in ``straight``), then the same run started under
    ``torchrun --max-restarts 3`` saving to and resuming from ``name``, left running for the
    test to disturb. Returns (reference job, reference dir, save dir, log, tag, process)."""
    straight = str(tmp_path / "straight")
    job = run_job(torchrun(2) + [SCRIPT, *args, "--save", straight], str(tmp_path / "straight.log"),
                  timeout=timeout)
    assert job.returncode == 0, job.output[-3000:]
    save, log = str(tmp_path / name), str(tmp_path / f"{name}.log")
    tag = procs.new_tag()
    proc = procs.start(torchrun(2, "--max-restarts", "3") + [SCRIPT, *args, *extra, "--save", save,
                                                             "--load", save], tag, log)
    return job, straight, save, log, tag, proc
