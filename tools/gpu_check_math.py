"""tools/gpu_check.py's first check: the memory math on a device against the float64 references.

Each fast path (scan, value peek, retrieval under every visibility rule, with and without packed
documents) runs on the device, in fp32 or under bf16 autocast, forward and backward; the loop
references of megatron_mosaic.memory.reference run in float64 on the CPU. Inputs are drawn on
the CPU from a fixed seed, so every device checks the same numbers.
"""

from __future__ import annotations

import torch

from megatron_mosaic.memory import SequenceLayout, Visibility, associative_recall, linear_recurrence, peek_values
from megatron_mosaic.memory import reference as ref

# Relative error (of the max) allowed against float64, fp32 and bf16 autocast alike: the memory
# math runs in fp32 regions under autocast (memory/precision.py). Measured on the CPU: 1.4e-5 for
# both; with the matmuls left to autocast, 0.07 (scores near 100 rounded to bf16).
TOLERANCE = {torch.float32: 5e-4, torch.bfloat16: 5e-4}
RULES = [Visibility(delay=1), Visibility(delay=1, window=5), Visibility(delay=4), Visibility(delay=0)]
B, H, T, D = 2, 2, 24, 16  # head size 16: FlexAttention's smallest on CUDA
# Retrieval kernels checked with gradients: FlexAttention has no CPU backward (the test suite
# checks its CPU forward, tests/memory/test_flex.py).
BACKENDS = {"cuda": ("sdpa", "flex"), "cpu": ("sdpa",)}


def _packed_layout() -> SequenceLayout:
    tokens = torch.ones(B, T, dtype=torch.long)
    tokens[0, [6, 15]] = 0
    tokens[1, 10] = 0
    return SequenceLayout.from_tokens(tokens, 0)


def _close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    got, want = got.detach().double().cpu(), want.detach().double()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= TOLERANCE[dtype]:
        raise AssertionError(f"{name} ({dtype}): relative error {err:.2e} > {TOLERANCE[dtype]:.0e}")


def _on(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """fp32 leaf copies on the device: the layers hand keys, queries and values over in fp32
    (their scans and norms run in fp32), so bf16 autocast is what could round them."""
    return [t.detach().to(device, torch.float32).requires_grad_() for t in tensors]


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out.float() * upstream.to(out.device)).sum(), inputs))


def check_recall(device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> None:
    for packed in (False, True):
        layout = _packed_layout() if packed else SequenceLayout.contiguous(B, T)
        keys = ref.norm(torch.randn(B, H, T, D, generator=gen, dtype=torch.float64))
        queries = keys * (1.0 + 99.0 * torch.rand(B, H, T, 1, generator=gen, dtype=torch.float64))  # β up to 100
        values = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
        upstream = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
        for rule in RULES:
            mask = ref.visibility_mask(rule.delay, rule.window, layout.positions, layout.doc_starts,
                                       layout.positions, layout.doc_starts)
            q64, k64, v64 = (t.clone().requires_grad_() for t in (queries, keys, values))
            want, _ = ref.recall(q64, k64, v64, mask)
            want_grads = _grads(want, [q64, k64, v64], upstream)
            dev_layout = layout.to(device)
            for backend in BACKENDS.get(device.type, ("sdpa",)):
                q, k, v = _on(device, queries, keys, values)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    got = associative_recall(q, k, v, rule, dev_layout, dev_layout, backend=backend)
                name = (f"recall ({backend}) delay={rule.delay} window={rule.window} "
                        f"{'packed' if packed else 'one document'}")
                _close(name, got, want, dtype)
                for what, g, w in zip("qkv", _grads(got, [q, k, v], upstream.float()), want_grads):
                    _close(f"{name} d{what}", g, w, dtype)


def check_scan_and_peek(device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> None:
    layout = _packed_layout()
    x = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    log_decay = -torch.rand(B, H, T, 1, generator=gen, dtype=torch.float64)
    log_gain = 3.0 * torch.randn(B, H, T, 1, generator=gen, dtype=torch.float64)
    want = ref.recurrence(x, log_decay, log_gain, layout.resets)
    xs, a, g = _on(device, x, log_decay, log_gain)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        scaled, log_scale, _ = linear_recurrence(xs, a, g, layout.resets.to(device))
    # Compare directions (the keys are Norm(h)): the scan's scale is free per position.
    _close("scan (unit keys)", ref.norm(scaled.double().cpu()), ref.norm(want), dtype)
    mix = torch.rand(1, H, 1, 1, generator=gen, dtype=torch.float64)
    want = ref.peek_values(x, mix, layout.resets)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = peek_values(xs, mix.float().to(device), layout.resets.to(device))
    _close("value peek", got, want, dtype)


def check_all(device: torch.device, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    check_scan_and_peek(device, dtype, gen)
    check_recall(device, dtype, gen)
    print(f"    memory math {dtype}: scan, peek, recall ({len(RULES)} rules x 2 layouts x "
          f"{'/'.join(BACKENDS.get(device.type, ('sdpa',)))}, fwd + bwd) match float64")
