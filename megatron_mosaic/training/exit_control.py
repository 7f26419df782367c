"""When to stop early: SIGTERM (--exit-signal-handler), a wall-clock limit, an iteration interval.

Every rank must agree to stop on the same iteration (they all take part in the final save), so
the local reasons are combined with one MAX all-reduce per iteration.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mosaic.training.initialize import device


class ExitController:
    """Tracks the exit conditions; ``should_exit(iteration)`` is a collective call."""

    def __init__(self, *, handle_sigterm: bool, duration_mins: Optional[float],
                 exit_interval: Optional[int], start_time: Optional[float] = None):
        self.start_time = time.time() if start_time is None else start_time
        self.duration_s = None if duration_mins is None else 60.0 * duration_mins
        self.exit_interval = exit_interval
        self.signal_received = False
        self._previous_handler = None
        if handle_sigterm:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signal_received = True  # acted on at the end of the current iteration

    def should_exit(self, iteration: int) -> Optional[str]:
        """The reason to stop after ``iteration`` (identical on every rank), or None."""
        over_time = self.duration_s is not None and time.time() - self.start_time > self.duration_s
        flags = torch.tensor([float(self.signal_received), float(over_time)], device=device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return "received SIGTERM"
        if flags[1] > 0:
            return f"exceeded --exit-duration-in-mins {self.duration_s / 60.0:g}"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"reached --exit-interval {self.exit_interval}"
        return None

    def release(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
