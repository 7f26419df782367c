"""A dispatch mode that fails on any tensor off the model's device, for device-placement tests.

On a CPU-only machine a tensor forced onto the CPU is invisible: everything is on the CPU. The
tests build the models on the CPU, move them to the ``meta`` device (shapes, no data) and run
forward and backward under ``OnlyOn("meta")``: an op that creates or reads a CPU tensor (a
buffer left behind, ``torch.arange`` without ``device=``, a ``.cpu()``) raises there, exactly
where it would mix devices on a GPU. Meta tensors hold no data, so a host sync (``.item()``,
``bool(tensor)``) fails too: the forward is also proven free of per-layer syncs.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class OnlyOn(TorchDispatchMode):
    """Raise on any op whose inputs or outputs include a tensor (other than a 0-dim scalar,
    which every device accepts) on a device other than ``device``."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors, _ = tree_flatten((args, kwargs, out))
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.device != self.device:
                raise RuntimeError(f"{func}: a {tuple(t.shape)} tensor on {t.device}, the model is on {self.device}")
        return out
