"""Process groups, parallel_state and seeds: the same calls on a CPU box (gloo) and GPUs (nccl)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import random
import socket
import time
import uuid
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_mosaic.training import cuda_compat


def world_size_from_env() -> int:
    """World size set by torchrun (1 when run as a plain script)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def single_rank_megatron(seed: int | None = None) -> Iterator[None]:
    """A one-rank gloo group with Megatron's parallel state at TP=PP=1, for tools and in-process
    tests that build Megatron modules without torchrun. Whatever this call created is torn down
    on exit; the caller's environment variables are not touched."""
    if not torch.cuda.is_available():
        cuda_compat.apply()
    created_group = not dist.is_initialized()
    if created_group:
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    elif dist.get_world_size() != 1:
        raise RuntimeError(f"single_rank_megatron: a {dist.get_world_size()}-rank process group is already active")
    created_state = not parallel_state.model_parallel_is_initialized()
    if created_state:
        parallel_state.initialize_model_parallel()
    try:
        if seed is not None:
            set_random_seeds(seed)
        yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()


def _user_set_omp_threads() -> bool:
    """Whether OMP_NUM_THREADS comes from the user rather than torchrun's default.

    torchrun exports OMP_NUM_THREADS=1 to its workers whenever its own environment lacks it, so
    the worker cannot tell the two apart from its environment; torchrun's launch environment
    (its /proc environ, fixed at exec) can. Where it cannot be read, the value is respected.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    if "TORCHELASTIC_RUN_ID" not in os.environ or os.environ["OMP_NUM_THREADS"] != "1":
        return True
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            return b"OMP_NUM_THREADS=" in f.read()
    except OSError:
        return True


def configure_threads() -> str:
    """torch intra-op threads = cores available to this process / ranks on this host (at least
    1), unless the user set OMP_NUM_THREADS. Returns a line for the start-up log.

    torch's default (every core, per process) oversubscribes a host running several ranks.
    """
    if _user_set_omp_threads():
        return f"{torch.get_num_threads()} intra-op threads per rank (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    threads = max(1, cores // max(local_ranks, 1))
    torch.set_num_threads(threads)
    return f"{threads} intra-op threads per rank ({cores} cores / {local_ranks} local ranks)"


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_distributed(args: argparse.Namespace) -> None:
    """Start the process group (if not yet started) and Megatron's model-parallel groups."""
    start_process_group(args.distributed_backend, distributed_timeout(args))
    if dist.get_world_size() != args.world_size:
        raise RuntimeError(f"arguments were validated for world size {args.world_size} but the "
                           f"process group has {dist.get_world_size()} ranks")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            distributed_timeout_minutes=getattr(args, "distributed_timeout_minutes", 10),
        )
    else:
        _check_existing_layout(args)
    threads = configure_threads()
    if dist.get_rank() == 0:
        print(f" {threads}", flush=True)
    set_random_seeds(args.seed)


def start_process_group(backend: str | None = None,
                        timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> None:
    """The process group, unless one is already started, from torchrun's environment; a plain
    ``python pretrain_mosaic.py`` run becomes a one-rank group so the rest of the code needs no
    special case. ``backend`` None: nccl on LOCAL_RANK's GPU, else gloo. Without CUDA the CPU
    patches (``cuda_compat``) are applied even to an existing group: Megatron is used next.
    """
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cuda_compat.apply()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout)


def distributed_timeout(args: argparse.Namespace) -> datetime.timedelta:
    """--distributed-timeout-minutes: the longest any rank waits for a peer."""
    return datetime.timedelta(minutes=float(getattr(args, "distributed_timeout_minutes", 10)))


def init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """``dist.init_process_group`` from torchrun's / the launcher's environment, restart-safe.

    Under torchrun the workers' store is, by default, one that the agent hosts and keeps for the
    whole job (``TORCHELASTIC_USE_AGENT_STORE``). After ``--max-restarts`` restarts the workers
    the keys of the previous attempt are still in it: the new ranks read their dead peers'
    addresses (Gloo ``connectFullMesh ... Connection refused``) or stale barrier counts (a
    hang). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` avoids that in the agent; here the worker
    does the same by itself, so users need not know: rank 0 hosts a fresh store for this
    attempt and announces it through the agent's store (``attempt_store``).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = attempt_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world,
                              timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)


_ATTEMPT_KEY = "megatron_mosaic/attempt_store"
_attempt_server = None  # rank 0's store server: lives as long as this process


def attempt_store(agent_addr: str, agent_port: int, rank: int, world: int,
                  timeout: datetime.timedelta) -> dist.Store:
    """A TCPStore for this attempt only, hosted by rank 0 and found through the agent's store.

    Rank 0 starts a server on a free port, writes a random nonce into it, then publishes
    ``nonce host:port`` in the agent's store. The other ranks read that record; one left by an
    earlier attempt names a server that died with its rank 0 (or a port now used by something
    else), so a rank accepts a record only once it has connected to the server it names and
    found the same nonce there, and retries otherwise, until ``timeout``.
    """
    global _attempt_server
    agent = dist.TCPStore(agent_addr, agent_port, world, is_master=False, timeout=timeout)
    if rank == 0:
        nonce = uuid.uuid4().hex
        _attempt_server = dist.TCPStore(agent_addr, 0, world, is_master=True, timeout=timeout,
                                        wait_for_workers=False)
        _attempt_server.set("nonce", nonce)
        agent.set(_ATTEMPT_KEY, f"{nonce} {agent_addr} {_attempt_server.port}")
        return _attempt_server
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        nonce, host, port = agent.get(_ATTEMPT_KEY).decode().split()  # waits for a first record
        if _accepts_connections(host, int(port)):  # (quietly: a TCPStore client would log)
            try:
                client = dist.TCPStore(host, int(port), world, is_master=False,
                                       timeout=datetime.timedelta(seconds=10))
                if client.get("nonce").decode() == nonce:
                    client.set_timeout(timeout)
                    return client
            except (RuntimeError, ValueError, OSError):
                pass  # the port belongs to something else now
        if time.monotonic() > deadline:
            raise RuntimeError(f"no store of this attempt announced by rank 0 within {timeout} "
                               f"(through the torchrun agent's store at {agent_addr}:{agent_port})")
        time.sleep(0.2)


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def _check_existing_layout(args: argparse.Namespace) -> None:
    """An already-initialised parallel state (notebooks, tests) must match the arguments."""
    have = {
        "--tensor-model-parallel-size": parallel_state.get_tensor_model_parallel_world_size(),
        "--pipeline-model-parallel-size": parallel_state.get_pipeline_model_parallel_world_size(),
        "--context-parallel-size": parallel_state.get_context_parallel_world_size(),
    }
    want = {
        "--tensor-model-parallel-size": args.tensor_model_parallel_size,
        "--pipeline-model-parallel-size": args.pipeline_model_parallel_size,
        "--context-parallel-size": args.context_parallel_size,
    }
    wrong = [f"{name} {want[name]} (initialised: {have[name]})" for name in have if have[name] != want[name]]
    if wrong:
        raise RuntimeError("the Megatron parallel state is already initialised with another layout: "
                           + ", ".join(wrong) + "; call parallel_state.destroy_model_parallel() first")


def set_random_seeds(seed: int) -> None:
    """Seed python, numpy and torch (the runtime streams: dropout, sampling); pipeline stages get
    distinct streams as in Megatron-LM.

    Initial weights do not come from these streams: model_builder sets ``config.init_seed`` =
    ``args.seed`` and every layer, the embedding, output layer and final norm draw from their
    own stream of it (megatron_mosaic.model.init_rng), so the per-stage offset below cannot
    make a PP layout start from other weights than one process. Tensor-parallel ranks share the
    seed so anything built without ``init_seed`` still agrees across them. On GPU Megatron's
    CUDA RNG tracker gives TP regions their own streams; on the CPU that tracker cannot be
    built, so a no-op tracker is installed (dropout in TP regions then draws from the rank's
    CPU generator).
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
