"""--save is checked at start-up; a failed save cleans up after itself and says why; a checkpoint
with NaN/Inf weights or optimizer state is never written."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess

import pytest
import torch

from megatron_mosaic.training.checkpointing import read_tracker
from tests.faults.common import MOCK, PY, SCRIPT, run_distributed_bounded, run_job, torchrun


@contextlib.contextmanager
def small_disk(path, size: str):
    """A tmpfs of ``size`` at ``path`` (root only; the test is skipped elsewhere)."""
    os.makedirs(path, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only_dir(path):
    """A directory nobody may create files in, root included (chattr +i)."""
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {proc.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def _one_error(job) -> str:
    errors = job.errors()
    assert len(errors) == 1, job.output[-3000:]
    assert " iteration " not in job.output or "saving" in errors[0]
    assert job.left == [], job.left
    return errors[0]


def test_unwritable_save_found_at_start_up(tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        job = run_job([PY, SCRIPT, *MOCK, "--train-iters", "3", "--save", ro], str(tmp_path / "log"))
    assert job.returncode == 1
    assert _one_error(job) == f"ERROR: --save {ro}: not writable (Operation not permitted)"
    assert " iteration " not in job.output  # found before the first step, not after training


def test_too_little_space_found_at_start_up(tmp_path):
    with small_disk(tmp_path / "disk", "256k") as disk:
        job = run_job([PY, SCRIPT, *MOCK, "--train-iters", "3", "--save", f"{disk}/ckpt"],
                      str(tmp_path / "log"))
    assert job.returncode == 1
    assert re.fullmatch(rf"ERROR: --save {disk}/ckpt: [\d.]+ KiB free, but one checkpoint needs about [\d.]+ MiB",
                        _one_error(job)), job.output[-2000:]


def test_disk_filling_up_during_training(tmp_path):
    """Room for one checkpoint at start-up, but every save adds one: a later save fails. The
    run stops naming the directory and its free space; the partial directory is gone and the
    tracker names the last complete checkpoint."""
    with small_disk(tmp_path / "disk", "3m") as disk:
        save = f"{disk}/ckpt"
        job = run_job(torchrun(2) + [SCRIPT, *MOCK, "--train-iters", "40", "--save", save,
                                     "--save-interval", "1"], str(tmp_path / "log"))
        assert job.returncode != 0, job.output[-3000:]
        error = _one_error(job)
        match = re.fullmatch(rf"ERROR: saving {save}/iter_(\d+) failed \(.+\); {save} has [\d.]+ (B|KiB) free; "
                             rf"the partial directory was removed and the latest checkpoint is still "
                             rf"iteration (\d+)", error)
        assert match, error
        failed, latest = int(match.group(1)), int(match.group(3))
        assert failed > 1 and latest == failed - 1
        assert read_tracker(save) == latest
        assert sorted(os.listdir(save)) == [f"iter_{i:07d}" for i in range(1, failed)] + [
            "latest_checkpointed_iteration.txt"]


def _non_finite(rank: int, world_size: int, root: str) -> dict:
    from megatron_mosaic.training.checkpoint_safety import NonFiniteCheckpointError
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.pretrain import Run
    from tests.training.common import tiny_args

    save = os.path.join(root, "ckpt")
    args = tiny_args("mosaic-v2", ["--train-iters", "2", "--save", save], world_size)
    initialize_distributed(args)
    run = Run(args)
    run.fit()  # saves iteration 2
    out = {}
    # A weight on rank 1 only, then an optimizer moment on rank 0 only: neither is written.
    for case in ("weight", "optimizer"):
        run.state.iteration += 1
        if case == "weight" and rank == 1:
            next(run.model[0].parameters()).data.view(-1)[0] = float("nan")
        if case == "optimizer":
            with torch.no_grad():
                for param in run.model[0].parameters():
                    param.nan_to_num_(0.0)
        if case == "optimizer" and rank == 0:
            real = run.optimizer.sharded_state_dict

            def poisoned(*a, **k):  # whatever the optimizer, what it hands the save holds an Inf
                from megatron.core.dist_checkpointing.dict_utils import nested_values
                from megatron.core.dist_checkpointing.mapping import ShardedTensor

                state = real(*a, **k)
                moment = next(v for v in nested_values(state)
                              if isinstance(v, ShardedTensor) and v.data is not None and v.data.numel())
                moment.data = moment.data.clone()
                moment.data.view(-1)[0] = float("inf")
                return state

            run.optimizer.sharded_state_dict = poisoned
        try:
            run.save()
            out[case] = None
        except NonFiniteCheckpointError as err:
            out[case] = str(err)
        out[f"{case}_dirs"] = sorted(os.listdir(save))
        out[f"{case}_tracker"] = read_tracker(save)
        # Every rank looks before rank 0 creates the next case's staging directory.
        torch.distributed.barrier()
    return out


def test_non_finite_state_is_never_saved(tmp_path):
    for rank, r in enumerate(run_distributed_bounded(_non_finite, 2, str(tmp_path))):
        for case, it in (("weight", 3), ("optimizer", 4)):
            assert r[case] is not None, f"rank {rank}: a {case} with NaN/Inf was saved"
            assert f"iteration {it}:" in r[case] and "holds NaN or Inf" in r[case], r[case]
            assert f"still names iteration 2" in r[case]
            assert r[f"{case}_dirs"] == ["iter_0000002", "latest_checkpointed_iteration.txt"], r
            assert r[f"{case}_tracker"] == 2
        assert "(rank 1)" in r["weight"] and "(rank 0)" in r["optimizer"]


def _failed_on_rank0(rank: int, world_size: int, root: str) -> dict:
    """Rank 0 fails writing the checkpoint's metadata (its last step) while rank 1 has finished
    and waits for it in megatron-core's barrier: both must stop, in bounded time, agreed."""
    import errno
    import time

    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from megatron_mosaic.training.checkpoint_safety import CheckpointSaveError
    from megatron_mosaic.training.initialize import initialize_distributed
    from megatron_mosaic.training.pretrain import Run
    from tests.training.common import tiny_args

    save = os.path.join(root, "ckpt")
    args = tiny_args("mosaic-v2", ["--train-iters", "2", "--save", save], world_size)
    initialize_distributed(args)
    run = Run(args)
    run.fit()  # iteration 2 saved
    if rank == 0:
        def finish(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", "/simulated/.metadata")

        FileSystemWriterAsync.finish = finish
    run.state.iteration += 1
    start = time.monotonic()
    try:
        run.save()
        error = None
    except CheckpointSaveError as err:
        error = str(err)
    return {"error": error, "seconds": time.monotonic() - start, "initialized": dist.is_initialized(),
            "dirs": sorted(os.listdir(save)), "tracker": read_tracker(save)}


def test_save_failing_on_one_rank_stops_every_rank(tmp_path):
    results = run_distributed_bounded(_failed_on_rank0, 2, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["error"] is not None, f"rank {rank} did not learn that the save failed"
        assert "rank 0: OSError: [Errno 28] No space left on device" in r["error"], r["error"]
        assert "the partial directory was removed and the latest checkpoint is still iteration 2" in r["error"]
        assert r["seconds"] < 60, r["seconds"]
        assert r["dirs"] == ["iter_0000002", "latest_checkpointed_iteration.txt"]
        assert r["tracker"] == 2
