"""The torch.compile'd scan (the CUDA default) against the eager chunked scan and the float64
step-by-step recurrence, forward and backward. Inductor compiles for the CPU here too (gcc), so
the compiled path is tested without a GPU; shapes are small because compiling costs
tens of seconds on this CPU."""

import torch
import torch._inductor.config

from megatron_mosaic.memory import linear_recurrence
from megatron_mosaic.memory import reference as ref
from tests.memory.helpers import assert_close, grads, random_layout


def _run(x, a, g, resets, compiled, upstream):
    leaves = [t.float().clone().requires_grad_() for t in (x, a, g)]
    scaled, log_scale, final = linear_recurrence(*leaves, resets=resets, chunk_size=4, compiled=compiled)
    h = scaled * torch.exp(log_scale)
    return h, grads(h, leaves, upstream), final


def test_compiled_scan_matches_chunked_and_float64():
    gen = torch.Generator().manual_seed(7)
    B, H, T, D = 2, 3, 10, 5  # T not a multiple of the chunk: the padded tail and 2 recursion levels
    x = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    a = -torch.rand(B, H, T, 1, generator=gen, dtype=torch.float64) * 3
    g = torch.rand(B, H, T, 1, generator=gen, dtype=torch.float64) * 2 - 1
    resets = random_layout(B, T, 0.15, gen).resets
    upstream = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    h_eager, g_eager, final_eager = _run(x, a, g, resets, False, upstream)
    with torch._inductor.config.patch(compile_threads=1):  # no worker pool to start for one graph
        h_comp, g_comp, final_comp = _run(x, a, g, resets, True, upstream)
    assert_close(h_comp, h_eager, rtol=1e-5, atol=1e-5, what="compiled vs chunked h")
    assert_close(final_comp.materialize(), final_eager.materialize(), rtol=1e-5, atol=1e-5, what="final state")
    for name, gc, ge in zip(["x", "log_decay", "log_gain"], g_comp, g_eager):
        assert_close(gc, ge, rtol=1e-5, atol=1e-5, what=f"compiled vs chunked grad {name}")
    leaves64 = [t.clone().requires_grad_() for t in (x, a, g)]
    h64 = ref.recurrence(*leaves64, resets=resets)
    assert_close(h_comp, h64, atol=1e-4, what="compiled vs float64 h")
    for name, gc, gs in zip(["x", "log_decay", "log_gain"], g_comp, grads(h64, leaves64, upstream)):
        assert_close(gc, gs, rtol=1e-4, atol=1e-4, what=f"compiled vs float64 grad {name}")


def test_one_compiled_graph_with_and_without_document_starts(monkeypatch):
    """A micro-batch without document starts (resets None) runs the graph compiled for packed
    ones: one compilation, not one per kind of micro-batch, and the eager chunked values."""
    from torch._dynamo.testing import CompileCounter

    from megatron_mosaic.memory import scan

    counter = CompileCounter()  # counts the graphs compiled; runs them eagerly (fast)
    monkeypatch.setattr(scan, "_COMPILED_CORE", torch.compile(scan._scan_fp32, backend=counter))
    gen = torch.Generator().manual_seed(3)
    B, H, T, D = 2, 3, 12, 4
    x = torch.randn(B, H, T, D, generator=gen)
    a = -torch.rand(B, H, T, 1, generator=gen)
    g = torch.randn(B, H, T, 1, generator=gen)
    resets = random_layout(B, T, 0.2, gen).resets
    for r in (resets, None):
        compiled = linear_recurrence(x, a, g, resets=r, chunk_size=4, compiled=True)
        eager = linear_recurrence(x, a, g, resets=r, chunk_size=4, compiled=False)
        for c, e in zip(compiled[:2], eager[:2]):
            assert torch.equal(c, e)
    assert counter.frame_count == 1
