"""``--async-save``: checkpoints written in the background by megatron-core's asynchronous
dist-checkpointing, while training goes on.

``save_checkpoint(..., async_writer=w)`` plans the save and stages the tensors on every rank,
then ``w.schedule`` hands the writing to megatron-core's ``AsyncCallsQueue``: a process forked
per save (its memory is a copy-on-write snapshot of the state at that moment, so later
optimizer steps cannot leak into it; on GPUs the tensors are first copied to host memory)
writes this rank's shards into ``iter_N.partial``. ``w.finalize()``, called by every rank once
per iteration, completes the saves that all ranks have finished writing: the global metadata
is written, the directory renamed to ``iter_N`` and only then the tracker moved. Until that
moment the previous checkpoint is the latest, so a crash or kill during the background write
leaves it in place (the next start removes the partial directory).

At most one save is in the background: a new save first waits for the previous one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Optional

from megatron_mosaic.training import process_guard
from megatron_mosaic.training.checkpoint_safety import (
    CheckpointSaveError,
    agree_on_failed_save,
    save_failed_message,
)


@dataclass
class _Pending:
    final: str
    save_dir: str
    staging: str
    latest_before: Optional[int]


class AsyncCheckpointWriter:
    """One per run; every method is a collective call."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        process_guard.install()  # the writer's results come back through a guarded queue
        process_guard.set_async_save_mode(True)
        self._queue = AsyncCallsQueue(persistent=False)
        self._pending: list[_Pending] = []

    @property
    def in_flight(self) -> list[str]:
        return [p.final for p in self._pending]

    def schedule(self, request: Any, final: str, save_dir: str, staging: str,
                 latest_before: Optional[int]) -> None:
        self._pending.append(_Pending(final, save_dir, staging, latest_before))
        self._queue.schedule_async_request(request)

    def finalize(self, blocking: bool = False) -> list[str]:
        """Complete the saves every rank has finished writing (with ``blocking``: wait for
        all); returns their directories, now the latest. A background write that failed on
        any rank raises CheckpointSaveError on every rank, its partial directory removed."""
        if not self._pending:
            return []
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except Exception as err:  # noqa: BLE001 -- every rank must learn that the save failed
            failed = self._pending.pop(0)
            reason = agree_on_failed_save(failed.final, err)
            # Every rank removes it (idempotent on a shared file system): after an abort no
            # barrier is left to wait for one rank's removal before reporting it removed.
            shutil.rmtree(failed.staging, ignore_errors=True)
            self._pending.clear()
            raise CheckpointSaveError(save_failed_message(failed.final, failed.save_dir, reason,
                                                          failed.latest_before)) from None
        finished = self._pending[:len(done)]
        del self._pending[:len(done)]
        return [p.final for p in finished]

    def close(self) -> list[str]:
        """Wait for every background save and complete it."""
        return self.finalize(blocking=True)
