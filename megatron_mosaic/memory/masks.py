"""Masks of the memory math that depend on shapes alone, and SDPA's additive form of a mask."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor


def additive_mask(visible: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``visible`` (bool) as an additive mask: 0 where visible, -inf elsewhere (SDPA converts a
    bool mask on every call; exp of -inf gives 0 and a zero gradient)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def outside_autograd(build: Callable, *args):
    """``build(*args)`` outside autograd and inference mode: a cached constant that autograd may
    save for a backward that runs later, which an inference-mode tensor cannot be."""
    with torch.inference_mode(False), torch.no_grad():
        return build(*args)


def shape_constant(maxsize: int) -> Callable:
    """Decorator for a builder of tensors that depend on its (hashable) arguments alone: eager,
    each is built once per arguments (``outside_autograd``) and cached; while torch.compile
    traces, built inline (the graph's constants)."""
    def decorate(build: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(functools.partial(outside_autograd, build))

        @functools.wraps(build)
        def get(*args):
            return build(*args) if torch.compiler.is_compiling() else cached(*args)
        return get
    return decorate
