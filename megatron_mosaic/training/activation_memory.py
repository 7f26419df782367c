"""Measure the activation memory a forward pass leaves for its backward pass.

Every tensor autograd keeps for backward goes through ``saved_tensors_hooks``' pack hook; the
distinct storages behind them, parameters excluded, are exactly the activation bytes held
between forward and backward (what activation recomputation trades for compute). Used by
``tools/bench_recompute.py`` and by the memory estimator's test; CPU and GPU alike.
"""

from __future__ import annotations

from typing import Iterable

import torch


class SavedTensorMeter:
    """Context manager: ``meter.bytes`` = bytes of distinct non-parameter storages saved for
    backward by the autograd graph built inside it. Leave it before running backward (the
    recomputation of checkpointed regions saves tensors again, and would be counted)."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self._exclude = {p.untyped_storage().data_ptr() for p in parameters}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        # A storage cannot be freed and reused while a saved tensor still holds it, so during
        # one forward pass the pointer identifies the storage.
        if ptr not in self._exclude and ptr != 0:
            self._storages[ptr] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._storages.clear()
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())
