"""Where the memory math leaves mixed precision.

Under bf16 autocast every matmul runs in bf16, and a bf16 result carries 8 bits: a retrieval
score near 100 (unit keys times an adaptive bandwidth β_t of that size) is rounded in steps of
0.5, which reorders a softmax; the scan's chunk weights exp(log w) lose the same bits. So the
scan, the scores and the softmax run in fp32 regions (autocast off, inputs upcast), and the
tensors between those regions (keys, values, memory outputs) stay in the compute dtype.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def fp32_region(device: torch.device) -> Iterator[None]:
    """Autocast off on ``device``'s type (a no-op where autocast does not exist, e.g. meta)."""
    kind = device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        yield
        return
    with torch.autocast(device_type=kind, enabled=False):
        yield


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype activations on ``x``'s device are computed in: autocast's when it is on, else x's."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def upcast(x: Tensor) -> Tensor:
    """fp32 for half-precision tensors; fp32/fp64 stay as they are (fp64 references)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
