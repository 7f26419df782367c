"""Run a test body in N gloo processes and collect what each rank returns.

Multi-process tests call ``run_distributed(fn, world_size, *args)``; ``fn(rank, world_size,
*args)`` must be a module-level function (spawned processes import it by name). Each rank's
return value must be picklable; an exception on any rank fails the test with that rank's
traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_mosaic.training.initialize import free_port


# Ranks are forked from a server process that has imported torch and megatron-core once for
# the whole session: a fresh interpreter per rank spends ~5 s of CPU on those imports, which was
# most of the time of most multi-process tests. Each rank is still a new process; it gets the
# caller's environment and working directory as a spawned one would.
multiprocessing.get_context("forkserver").set_forkserver_preload(
    ["torch", "torch.distributed", "megatron.core", "megatron_mosaic.training.pretrain", "tests.distributed"])


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple,
            env: dict, cwd: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # The server's stdout/stderr belong to whichever test started it: each rank writes to its
    # own file instead, which run_distributed hands to the calling test's output.
    log = os.open(os.path.join(out_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for fd in (1, 2):
        os.dup2(log, fd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    # Two cores shared by up to four ranks: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException:  # report every failure, including assertion errors, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        raise
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Spawn ``world_size`` gloo ranks running ``fn(rank, world_size, *args)``; return results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        try:
            mp.start_processes(
                _worker, args=(world_size, port, out_dir, fn, args, dict(os.environ), os.getcwd()),
                nprocs=world_size, join=True, start_method="forkserver",
            )
        except mp.ProcessRaisedException:
            pass  # the per-rank files below carry the real traceback
        except mp.ProcessExitedException:
            pass
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.log")
            if os.path.exists(path) and os.path.getsize(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    sys.stdout.write(f"----- rank {rank} output -----\n{f.read()}")
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise AssertionError(f"rank {rank} died without reporting a result")
            record = torch.load(path, weights_only=False)
            if not record["ok"]:
                raise AssertionError(f"rank {rank} failed:\n{record['error']}")
            results.append(record["result"])
        return results
