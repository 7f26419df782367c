"""No process of a training job outlives it, however the job ends.

A worker starts helper processes: DataLoader workers and megatron-core's checkpoint writers
(forked), and, for its write results, a ``multiprocessing`` manager process (spawned) with
its resource tracker. torchrun stops a worker's process group only while the worker itself
is alive, so when a worker dies by a signal (``kill -9``, the OOM killer) or its launcher
does, these helpers used to live on, reparented to init, one set per restart.

``install()`` (once per worker, before any helper exists):
- every process this worker forks gets ``PR_SET_PDEATHSIG`` = SIGKILL: it dies with the
  thread that forked it (the main thread here), and in turn takes its own children along;
- megatron-core's results queue for synchronous saves is an in-process queue (no manager
  process at all); asynchronous saves get a manager whose server dies with the worker too;
- under torchrun the worker itself dies with its agent (a ``kill -9`` of torchrun leaves no
  worker waiting for peers);
- ``reap_children()`` (at the end of ``pretrain_mosaic.py``, success or error) stops whatever
  children remain.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import time
from typing import Any, Optional

_PR_SET_PDEATHSIG = 1
_installed = False
_parent_at_fork: Optional[int] = None
_async_manager: Any = None


def _resolve_prctl():
    # Resolved once, at import, in the worker: a forked child must not look it up itself
    # (ctypes.util.find_library runs ldconfig in a subprocess, which a child forked from a
    # multithreaded process can deadlock on). The running program already links libc.
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _resolve_prctl()


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) exits (Linux).
    Returns False where that is not available."""
    return _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _before_fork() -> None:
    global _parent_at_fork
    _parent_at_fork = os.getpid()


def _after_fork_in_child() -> None:
    if die_with_parent() and _parent_at_fork is not None and os.getppid() != _parent_at_fork:
        os._exit(1)  # the parent died between fork() and prctl(): nobody is waiting for us


def manager_process_initializer() -> None:
    """Runs first in a spawned manager server: die with the worker that started it."""
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:
        os._exit(1)


def _write_results_queue():
    """Replaces megatron-core's ``_get_write_results_queue``: its default is a queue served by
    a spawned manager process that nothing stops when the worker is killed."""
    global _async_manager
    if not _ASYNC_MODE[0]:
        return queue.Queue()  # synchronous saves put and get in this very process
    if _async_manager is None:
        import multiprocessing as mp
        from multiprocessing.managers import SyncManager

        _async_manager = SyncManager(ctx=mp.get_context("spawn"))
        _async_manager.start(initializer=manager_process_initializer)
    return _async_manager.Queue()


_ASYNC_MODE = [False]


def set_async_save_mode(enabled: bool) -> None:
    """Asynchronous saves write in a forked process: its results need a cross-process queue."""
    _ASYNC_MODE[0] = enabled


def install() -> None:
    """Set up this worker (idempotent); see the module doc."""
    global _installed
    if _installed:
        return
    _installed = True
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        # The agent started us from its main thread; if it dies, so do we (and our helpers).
        agent = os.getppid()
        die_with_parent()
        if os.getppid() != agent:
            os._exit(1)
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    filesystem_async._get_write_results_queue = _write_results_queue


def children() -> list[int]:
    """This process's direct children (every thread's)."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


def reap_children(timeout: float = 5.0) -> None:
    """Stop this process's remaining children: SIGTERM, then SIGKILL after ``timeout`` s."""
    global _async_manager
    if _async_manager is not None:
        try:
            _async_manager.shutdown()
        except Exception:  # noqa: BLE001 -- best effort; the kill below follows
            pass
        _async_manager = None
    pending = children()
    for pid in pending:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [pid for pid in pending if _alive_child(pid)]
        if pending:
            time.sleep(0.05)
    for pid in pending:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _alive_child(pid)


def _alive_child(pid: int) -> bool:
    """Reap ``pid`` if it has exited; True while it runs."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not ours to wait for, or already reaped
        return os.path.exists(f"/proc/{pid}") and not _is_zombie(pid)
    return done == 0


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return False
