"""Intra-op threads: cores / local ranks unless the user set OMP_NUM_THREADS (torchrun's own
default of 1 does not count as the user's)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch

from megatron_mosaic.training import initialize


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _launcher(env: dict) -> subprocess.Popen:
    """A stand-in torchrun parent whose launch environment we choose. Returned once it runs
    `sleep` with its environment in place: before its exec, /proc/PID/environ shows the forking
    test process's, and just after it, nothing (a real torchrun has long been running)."""
    proc = subprocess.Popen(["sleep", "60"], env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:  # exe first: an environ opened before the exec would still read the old one
            if os.path.basename(os.readlink(f"/proc/{proc.pid}/exe")) == "sleep":
                with open(f"/proc/{proc.pid}/environ", "rb") as f:
                    if f.read():
                        return proc
        except OSError:
            pass
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the stand-in launcher did not start sleep in 30 s")


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_threads_split_the_cores_between_local_ranks(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    line = initialize.configure_threads()
    expected = max(1, _cores() // 2)
    assert torch.get_num_threads() == expected
    assert line == f"{expected} intra-op threads per rank ({_cores()} cores / 2 local ranks)"


def test_users_omp_num_threads_is_respected(monkeypatch, restore_threads):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert initialize.configure_threads() == "1 intra-op threads per rank (OMP_NUM_THREADS)"
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("user_set", [False, True])
def test_torchruns_default_is_not_the_users_choice(monkeypatch, restore_threads, user_set):
    launch_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if user_set:
        launch_env["OMP_NUM_THREADS"] = "1"
    parent = _launcher(launch_env)
    try:
        monkeypatch.setattr(initialize.os, "getppid", lambda: parent.pid)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun exports either way
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        torch.set_num_threads(1)
        line = initialize.configure_threads()
    finally:
        parent.kill()
        parent.wait()
    if user_set:
        assert line.endswith("(OMP_NUM_THREADS)") and torch.get_num_threads() == 1
    else:
        assert torch.get_num_threads() == _cores(), line
