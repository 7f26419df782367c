"""Run-time side of the Megatron-LM observability flags: timers, manual GC, the torch profiler,
memory statistics, Weights & Biases and throughput (flags in ``observability_args.py``)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.timers import Timers

# Timer names and the --timing-log-level that turns each on (as Megatron-LM's training loop).
# "forward-backward" and the level-2 "forward-compute", "backward-compute", "forward-recv" ... are
# started by Megatron-Core's schedules and grad sync through config.timers.
TIMERS = {"optimizer": 1, "evaluate": 1, "save-checkpoint": 1}


def memory_stats() -> dict[str, float]:
    """Megatron-LM's mem-* scalars (bytes): the CUDA allocator's on GPU, resident set on CPU."""
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
                "mem-allocated-bytes": stats["allocated_bytes.all.current"],
                "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"]}
    import psutil  # a megatron-core dist_checkpointing dependency, always installed

    return {"mem-resident-bytes": float(psutil.Process().memory_info().rss)}


class Observability:
    """Everything the flags add around the training loop; every method is cheap when off."""

    def __init__(self, args: argparse.Namespace, rank: int):
        self.args = args
        self.rank = rank
        self.timers = Timers(args.timing_log_level, args.timing_log_option)
        self.profiler: Optional[torch.profiler.profile] = None
        self.wandb = None
        if args.manual_gc:  # collections at aligned points only (Megatron-LM: rank jitter)
            gc.disable()
            gc.collect()
        if args.wandb_project and rank == 0:  # where the reporter holds the logged values
            self.wandb = _start_wandb(args)

    # ---- timers --------------------------------------------------------------------------------
    def timer(self, name: str):
        return self.timers(name, log_level=TIMERS.get(name, 2))

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        timer = self.timer(name)
        timer.start()
        try:
            yield
        finally:
            timer.stop()

    def timers_report(self, iterations: int) -> Optional[str]:
        """Per-iteration ms of each timer (min/max over ranks, --timing-log-option) since the last
        report, as Megatron-LM's timers print them; collective, so every rank calls it."""
        if self.args.timing_log_level == 0:
            return None
        names = sorted(self.timers._timers)  # created in the same order on every rank
        return self.timers.get_all_timers_string(names, normalizer=max(iterations, 1), reset=True,
                                                 barrier=False)

    # ---- per step --------------------------------------------------------------------------------
    def step_start(self, iteration: int) -> None:
        """``iteration``: steps completed before this one (Megatron-LM's profile steps count so)."""
        args = self.args
        if args.profile and self.rank in args.profile_ranks and iteration == args.profile_step_start:
            self.profiler = _start_profiler(args, self.rank)

    def step_end(self, iteration: int) -> None:
        args = self.args
        if self.profiler is not None:
            self.profiler.step()
            if iteration >= args.profile_step_end:
                self.profiler.stop()  # writes the trace (on_trace_ready)
                self.profiler = None
        if args.empty_unused_memory_level >= 1 and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if args.manual_gc and args.manual_gc_interval and iteration % args.manual_gc_interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        if self.args.manual_gc and self.args.manual_gc_eval:
            gc.collect()
        with self.timed("evaluate"):
            yield
        if self.args.manual_gc and self.args.manual_gc_eval:
            gc.collect()
        if self.args.empty_unused_memory_level >= 2 and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def scalars(self, iteration: int, values: dict[str, float], writer: Any) -> None:
        """At a log step: TensorBoard (``writer``) gets what the reporter does not write itself
        (throughput, memory); wandb gets the log line's numbers too."""
        extra = memory_stats() if self.args.log_memory_to_tensorboard else {}
        if "throughput" in values:
            extra["throughput"] = values["throughput"]
        if writer is not None:
            for key, value in extra.items():
                writer.add_scalar(key, value, iteration)
        if self.wandb is not None:
            self.wandb.log({**values, **extra}, step=iteration)

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        if self.args.manual_gc:
            gc.enable()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def profile_dir(args: argparse.Namespace) -> str:
    return os.path.join(args.tensorboard_dir or args.save or ".", "profile")


def _start_profiler(args: argparse.Namespace, rank: int) -> torch.profiler.profile:
    """Record steps [start, end) into a Chrome-trace JSON (chrome://tracing, Perfetto, TensorBoard)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    steps = args.profile_step_end - args.profile_step_start
    profiler = torch.profiler.profile(
        activities=activities, record_shapes=True,
        schedule=torch.profiler.schedule(wait=0, warmup=0, active=steps, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(profile_dir(args),
                                                                worker_name=f"rank{rank}"))
    profiler.start()
    return profiler


def _start_wandb(args: argparse.Namespace):
    import wandb

    save_dir = args.wandb_save_dir or os.path.join(args.save or ".", "wandb")
    os.makedirs(save_dir, exist_ok=True)
    return wandb.init(project=args.wandb_project, name=args.wandb_exp_name, dir=save_dir,
                      config=vars(args))
