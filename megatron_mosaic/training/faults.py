"""Failing together: a check that fails on one rank fails on every rank, with one message.

Start-up checks (data, ``--load``, ``--save``) run on every rank, but a problem one rank finds
(a file only its node cannot read, a full local disk) would otherwise leave the other ranks
waiting for it in the next collective until the distributed timeout. ``agree`` runs a check on
every rank and exchanges the outcomes: if any rank raised, every rank raises ``AgreedError``
with the first failing rank's message, and rank 0 reports it (``report_error``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import torch.distributed as dist

from megatron_mosaic.errors import describe, is_user_error, print_error

T = TypeVar("T")


class AgreedError(Exception):
    """Raised on every rank when a collective check failed on some rank.

    ``user_error``: the failure was a user error (reported as one line); otherwise a bug,
    whose traceback the failing rank printed itself.
    """

    def __init__(self, message: str, rank: int, user_error: bool):
        super().__init__(message)
        self.rank = rank
        self.user_error = user_error


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(fn: Callable[[], T], what: str = "start-up check") -> T:
    """Run ``fn`` on every rank (a collective call); raise on all ranks if it raised on any."""
    rank, world = _world()
    outcome: Optional[tuple[bool, str]] = None  # (is a user error, message)
    result: Any = None
    original: Optional[BaseException] = None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 -- every failure must reach the other ranks
        original = err
        if isinstance(err, AgreedError):  # a nested agreement: every rank has it already
            outcome = (err.user_error, str(err))
        elif is_user_error(err):
            outcome = (True, describe(err))
        else:
            outcome = (False, f"{what} failed on rank {rank}: {type(err).__name__}: {err}")
    if world == 1:
        if original is not None:
            raise original
        return result
    outcomes: list[Optional[tuple[bool, str]]] = [None] * world
    dist.all_gather_object(outcomes, outcome)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return result
    if original is not None and not is_user_error(original) and not isinstance(original, AgreedError):
        # This rank's bug: keep its own traceback (printed by the caller's handler).
        raise original
    first_rank, (user, message) = failed[0]
    if original is not None and user and first_rank == rank:
        raise AgreedError(message, first_rank, True) from original
    raise AgreedError(message, first_rank, user)


_PEER_TIMEOUT = ("timed out", "timeout", "time out")


def is_peer_timeout(err: BaseException) -> bool:
    """A collective or store operation gave up waiting for a peer (--distributed-timeout-minutes)."""
    text = str(err).lower()
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(names & {"RuntimeError", "DistError"}) and any(t in text for t in _PEER_TIMEOUT) and (
        "gloo" in text or "nccl" in text or "store" in text or "DistError" in names)


def report_error(err: BaseException, timeout_minutes: Optional[float] = None) -> bool:
    """Print a user error as one ``ERROR:`` line on rank 0; True if ``err`` was one (the caller
    exits with status 1), False for a bug (the caller re-raises it: traceback).

    A peer that did not answer within the distributed timeout is reported the same way, by
    the rank that waited (rank 0 may be the one that stopped answering)."""
    rank, _ = _world()
    if is_peer_timeout(err):
        first = " ".join(str(err).split("\n")[0].split())[:300]
        limit = f" {timeout_minutes:g}" if timeout_minutes is not None else ""
        print_error(f"rank {rank}: a peer did not answer within --distributed-timeout-minutes{limit}; "
                    f"giving up ({first})")
        return True
    if isinstance(err, AgreedError):
        if err.user_error and rank == 0:
            print_error(str(err))
        elif not err.user_error and rank == 0:
            print_error(f"{err} (its traceback is in that rank's output)")
        return True
    if not is_user_error(err):
        return False
    if rank == 0:
        print_error(describe(err))
    return True
