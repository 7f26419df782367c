"""Shared helpers for the memory-math tests: seeded random inputs and layouts."""

from __future__ import annotations

import torch

from megatron_mosaic.memory import SequenceLayout

EOD = 0


def random_tokens(batch: int, seq_len: int, eod_prob: float, gen: torch.Generator) -> torch.Tensor:
    """(B, T) tokens in 1..99 with EOD (0) at random places (consecutive EODs included)."""
    tokens = torch.randint(1, 100, (batch, seq_len), generator=gen)
    eod = torch.rand(batch, seq_len, generator=gen) < eod_prob
    return tokens.masked_fill(eod, EOD)


def random_layout(batch: int, seq_len: int, eod_prob: float, gen: torch.Generator) -> SequenceLayout:
    return SequenceLayout.from_tokens(random_tokens(batch, seq_len, eod_prob, gen), EOD)


def grads(output: torch.Tensor, inputs: list[torch.Tensor], upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d <output, upstream> / d inputs (unused inputs give zeros)."""
    return torch.autograd.grad((output * upstream.to(output.dtype)).sum(), inputs, allow_unused=True,
                               materialize_grads=True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5,
                 what: str = "") -> None:
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")
