"""v2 adaptive bandwidth: β_t = β₁·n_t^α + β₀ per head, n_t = visible pairs."""

from __future__ import annotations

from torch import Tensor


def adaptive_bandwidth(theta_0: Tensor, theta_1: Tensor, theta_alpha: Tensor, counts: Tensor) -> Tensor:
    """β_t with β₀ = exp(min(θ₀, 10)), β₁ = exp(min(θ₁, 10)), α = min(|θ_α|, 1).

    theta_*: (H,) per-head parameters; counts: (B, T) int64 n_t.
    Returns (B, H, T, 1) in theta's dtype, to multiply the query copy of the unit keys.
    """
    raise NotImplementedError
