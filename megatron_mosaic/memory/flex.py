"""Retrieval on torch's FlexAttention: every visibility rule as one block-sparse kernel call.

The rule (same document, i <= t - delay, i > t - window) is a ``mask_mod`` over global positions
and document starts, so windows, delays, packed documents and a context-parallel rank's
non-adjacent chunks all go through one call with no (Tq, Tk) tensor: ``create_block_mask``
evaluates the rule per 128 x 128 block and the kernel skips the blocks it makes empty. Rows
with nothing visible come out as exactly 0 with lse -inf, as associative_recall promises.

Where it runs: compiled (``torch.compile``) on CUDA, which is the fast kernel, forward and
backward. On the CPU torch 2.13 runs it eagerly, forward only (no CPU backward), at dense cost:
there it serves the tests, which check it against the float64 references like every other path.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .layout import SequenceLayout

BLOCK = 128


def flex_supported(device: torch.device, needs_grad: bool) -> bool:
    """FlexAttention can serve this call: importable, and a backward only where one exists."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or not needs_grad


@functools.lru_cache(maxsize=None)
def _kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled on CUDA (the fused Triton kernel); eager elsewhere (compiling takes minutes on CPU).
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def rule_mask(query_layout: SequenceLayout, key_layout: SequenceLayout, delay: int, window: int | None):
    """The visibility rule as a FlexAttention ``mask_mod`` (b, h, q, k) -> bool.

    The delay and window are captured as tensors, not Python ints: torch.compile treats a
    captured int as a constant of the graph, so every new value (v2 draws the long-term delay
    anew each step) would compile the block mask and the kernel again, and past the recompile
    limit fall back to eager FlexAttention at dense cost. Tensors are inputs: one graph serves
    every delay (tests/memory/test_flex.py counts them)."""
    q_pos, q_doc = query_layout.positions, query_layout.doc_starts
    k_pos, k_doc = key_layout.positions, key_layout.doc_starts
    # new_full: a fill kernel on the device (torch.tensor would copy from the host and wait)
    delay_t = q_pos.new_full((), delay)
    window_t = None if window is None else q_pos.new_full((), window)

    def mask_mod(b, h, q, k):
        t, i = q_pos[b, q], k_pos[b, k]
        visible = (q_doc[b, q] == k_doc[b, k]) & (i <= t - delay_t)
        if window_t is not None:
            visible = visible & (i > t - window_t)
        return visible

    return mask_mod


def flex_recall(queries: Tensor, keys: Tensor, values: Tensor, delay: int, window: int | None,
                query_layout: SequenceLayout, key_layout: SequenceLayout, return_lse: bool = False):
    """y_t = Σ_{i visible} softmax_i(q_t·k_i) v_i with scale 1, as associative_recall.

    queries (B, H, Tq, D), keys (B, H, Tk, D), values (B, H, Tk, Dv); returns y (and lse, fp32,
    -inf on empty rows, when ``return_lse``).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, _, Tq, _ = queries.shape
    Tk = keys.shape[2]
    # One block mask per (layout pair, rule) and micro-batch: the layers share the layout object,
    # so they share the mask. Compiled on CUDA, where an eager build would hold a dense (Tq, Tk).
    # (Only for one layout against itself: other key layouts are transient CP blocks.)
    def build():
        return create_block_mask(rule_mask(query_layout, key_layout, delay, window), B, None, Tq, Tk,
                                 device=queries.device, BLOCK_SIZE=BLOCK, _compile=queries.is_cuda)

    shared = key_layout is query_layout
    mask = query_layout.derived(("flex_block_mask", delay, window), build) if shared else build()
    y, lse = _kernel(queries.device.type)(queries, keys, values, block_mask=mask, scale=1.0, return_lse=True)
    empty = torch.isinf(lse)[..., None]  # the kernel's output there is 0 already; keep it exact
    y = torch.where(empty, torch.zeros((), dtype=y.dtype, device=y.device), y)
    return (y, lse.float()) if return_lse else y
