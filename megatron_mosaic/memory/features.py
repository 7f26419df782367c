"""Per-head key and value feature formulas around the scans (spec sections 2-3).

Shared by the Megatron layers (megatron_mosaic.model) and the exported Hugging Face model, so
both compute exactly the same features. All inputs are fp32 (B, H, T, D) per-head tensors and
(H,) per-head parameters; outputs are fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unit_norm(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Norm(z) = z / (‖z‖ + eps) over the last dim (the official code's Norm, eps 1e-10)."""
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def leaky_keys(scaled: Tensor, log_scale: Tensor, key_scale: Tensor, scale_pow: int, key_scale_max: float,
               eps: float = 1e-10) -> Tensor:
    """v1 keys from the leaky-average scan: Norm(k̄) · exp(min(pow·10κ, key_scale_max)).

    scaled, log_scale: the scan output (k̄ = scaled · exp(log_scale); v1 gains are 1, so k̄ stays
    bounded and is materialized); key_scale κ: (H,). ``scale_pow`` is 1 for the contextual memory
    (query and stored copies are both scaled) and 2 for the persistent memory.
    """
    averaged = scaled.float() * log_scale.exp()
    exponent = (scale_pow * 10.0 * key_scale.float()).clamp(max=key_scale_max)
    # the scale divided by the norm per row first: one pass over the (B, H, T, D) keys, not two
    return averaged * (exponent.exp().view(1, -1, 1, 1) / (averaged.norm(dim=-1, keepdim=True) + eps))


def gated_unit_keys(scaled: Tensor, bandwidth: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """v2 unit keys Norm(k̄) from the gated scan's ``scaled`` output; with ``bandwidth`` β
    (broadcastable (…, T, 1)) also their query copy Norm(k̄)·β: (keys, queries).

    k̄_t = scaled_t · exp(log_scale_t) with a positive factor per position, so Norm(k̄) =
    Norm(scaled) (unbounded gains would overflow k̄ itself). No eps: clamping at the smallest
    normal float keeps any scale of ``scaled`` exact.
    """
    scaled = scaled.float()
    if bandwidth is None:
        return _UnitRows.apply(scaled, None)[0]
    return _UnitRows.apply(scaled, bandwidth.float().expand(*scaled.shape[:-1], 1))


_TINY = torch.finfo(torch.float32).tiny


class _UnitRows(torch.autograd.Function):
    """(x, β) -> (k, k·β), k = x / max(‖x‖, tiny) per row, with the backward written out:
    g = g_k + g_q·β, g_x = (g - k (g·k)) / ‖x‖, g_β = g_q·k. Five full-size passes where
    autograd's graph of the same formula takes about nine, plus its small ops (eager, each op
    is a dispatch and a pass over memory; tests/memory compare it with autograd in float64)."""

    @staticmethod
    def forward(ctx, x: Tensor, beta: Tensor | None) -> tuple[Tensor, Tensor | None]:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        inverse = norm.clamp_min(_TINY).reciprocal()
        keys = x * inverse
        queries = None if beta is None else keys * beta
        ctx.save_for_backward(keys, inverse, norm, beta)
        return keys, queries

    @staticmethod
    def backward(ctx, grad_keys: Tensor | None, grad_queries: Tensor | None):
        keys, inverse, norm, beta = ctx.saved_tensors
        grad_beta = None
        g = grad_keys
        if grad_queries is not None:
            if ctx.needs_input_grad[1]:
                grad_beta = (grad_queries * keys).sum(-1, keepdim=True)
            g = grad_queries * beta if g is None else torch.addcmul(g, grad_queries, beta)
        if g is None:
            return None, grad_beta
        # rows clamped at tiny have a constant 1/tiny factor: no projection term there
        dot = (g * keys).sum(-1, keepdim=True).masked_fill(norm < _TINY, 0.0)
        return torch.addcmul(g, keys, dot, value=-1) * inverse, grad_beta


def exp10_scale(theta: Tensor) -> Tensor:
    """v1 output scales exp(10θ) (values ν, persistent memory ν'): (1, H, 1, 1)."""
    return (10.0 * theta.float()).exp().view(1, -1, 1, 1)


V2_VALUE_LOG_SCALE_MAX = 15.0
"""v2 value scale bound: a_h = exp(clamp(θ, -15, 15)) stays within [e^-15, e^15]."""


def value_scale(theta: Tensor, version: int) -> Tensor:
    """Per-head value scale, (1, H, 1, 1): v1 exp(10ν); v2 a_h = exp(clamp(θ, -15, 15)).

    v2 starts at θ = 0 (a_h = 1) with gradient a_h·∂L/∂a_h, so it trains from its first step.
    The earlier form exp(min(|θ|, 15)) had d|θ|/dθ = 0 at θ = 0: θ never left 0 (zero Adam
    moments, and weight decay keeps an exact 0), so every v2 checkpoint and HF export made with
    it holds θ = 0 exactly and loads with the same a_h = 1 under this form.
    """
    if version == 1:
        return exp10_scale(theta)
    bound = V2_VALUE_LOG_SCALE_MAX
    return theta.float().clamp(-bound, bound).exp().view(1, -1, 1, 1)


def finish_values(mixed: Tensor, theta: Tensor, version: int, eps: float = 1e-10) -> Tensor:
    """Values from the peeked mix: Norm(c ṽ_t + (1-c) ṽ_{t+1}) · scale_h."""
    return _ScaledRows.apply(mixed.float(), value_scale(theta, version), eps)


class _ScaledRows(torch.autograd.Function):
    """(m, s) -> m · s / (‖m‖ + eps) per row (s: (1, H, 1, 1) per-head scales), with the
    backward written out (three full-size passes instead of autograd's five and its small ops):
    g_m = r g - m · r (g·m) / ((‖m‖ + eps) ‖m‖), r = s / (‖m‖ + eps); g_s = Σ (g·m) / (‖m‖ + eps)."""

    @staticmethod
    def forward(ctx, m: Tensor, scale: Tensor, eps: float) -> Tensor:
        norm = torch.linalg.vector_norm(m, dim=-1, keepdim=True)
        shifted = norm + eps
        ratio = scale / shifted  # one (…, 1) factor per row: a single pass over the values
        ctx.save_for_backward(m, norm, shifted, ratio)
        return m * ratio

    @staticmethod
    def backward(ctx, grad: Tensor):
        m, norm, shifted, ratio = ctx.saved_tensors
        along = (grad * m).sum(-1, keepdim=True)
        grad_scale = (along / shifted).sum((0, 2), keepdim=True) if ctx.needs_input_grad[1] else None
        # m = 0 rows: along = 0 gives 0, as autograd's norm does (divided one factor at a time:
        # the product of the two denominators would underflow to 0 in fp32)
        coef = ratio * along / shifted / norm.clamp_min(_TINY)
        return torch.addcmul(grad * ratio, m, coef, value=-1), grad_scale, None
