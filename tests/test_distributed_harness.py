"""The multi-process harness itself: results come back per rank, failures surface."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _all_reduce_rank(rank: int, world_size: int) -> float:
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return value.item()


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    dist.barrier()
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")


def test_results_come_back_per_rank():
    assert run_distributed(_all_reduce_rank, 2) == [3.0, 3.0]


def test_failure_on_one_rank_fails_the_test():
    with pytest.raises(AssertionError, match="deliberate failure on rank 1"):
        run_distributed(_fail_on_rank_one, 2)
