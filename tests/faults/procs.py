"""Launch jobs tagged with a unique environment variable, and find every process they left.

A process inherits its parent's environment, so every descendant of a tagged launch carries
the tag, even after it has been reparented to init (an orphan): scanning ``/proc/*/environ``
finds them all, whatever the process tree looks like by then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from typing import Optional, Sequence

TAG = "MEGATRON_MOSAIC_FAULT_TEST_TAG"


def new_tag() -> str:
    return uuid.uuid4().hex


def tagged_processes(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process carrying ``tag`` (zombies excluded)."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            if state in (b"Z", b"X"):
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append((int(entry), cmd))
    return found


def wait_for_no_processes(tag: str, timeout: float = 20.0) -> list[tuple[int, str]]:
    """Wait up to ``timeout`` s for the tagged processes to be gone; returns those left."""
    deadline = time.monotonic() + timeout
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill_tagged(tag: str) -> None:
    """SIGKILL whatever a test's job left (so a failing test does not leak its processes)."""
    for pid, _ in tagged_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tagged_env(tag: str, extra: Optional[dict] = None) -> dict:
    env = {**os.environ, TAG: tag, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def start(cmd: Sequence[str], tag: str, log_path: str, extra_env: Optional[dict] = None,
          cwd: Optional[str] = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session, stdout+stderr to ``log_path``."""
    log = open(log_path, "w")
    try:
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=tagged_env(tag, extra_env),
                                start_new_session=True, cwd=cwd)
    finally:
        log.close()


def reap(proc: subprocess.Popen, tag: str) -> Optional[list[tuple[int, str]]]:
    """End a started job's whole tree. Returns the tagged processes that outlived a job that had
    exited (None when the job was still running and had to be killed: nothing to judge)."""
    left = wait_for_no_processes(tag, timeout=15) if proc.poll() is not None else None
    kill_tagged(tag)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return left
