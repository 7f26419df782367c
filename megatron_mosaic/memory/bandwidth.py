"""v2 adaptive bandwidth: β_t = β₁·n_t^α + β₀ per head, n_t = visible pairs."""

from __future__ import annotations

import torch
from torch import Tensor


def adaptive_bandwidth(theta_0: Tensor, theta_1: Tensor, theta_alpha: Tensor, counts: Tensor) -> Tensor:
    """β_t with β₀ = exp(min(θ₀, 10)), β₁ = exp(min(θ₁, 10)), α = min(|θ_α|, 1).

    theta_*: (H,) per-head parameters; counts: (B, T) int64 n_t, or (B, G, T): the heads in G
    equal consecutive groups, group g counting by counts[:, g] (several memories' heads side by
    side, each with its own visibility, in one pass).
    Returns (B, H, T, 1) in theta's dtype, to multiply the query copy of the unit keys.

    n_t = 0 gives β₀ (0^α taken as 0, with a zero gradient for α; such rows are empty anyway).
    Computed in fp32 (fp64 if theta is fp64).
    """
    for name, th in (("theta_0", theta_0), ("theta_1", theta_1), ("theta_alpha", theta_alpha)):
        if th.dim() != 1:
            raise ValueError(f"adaptive_bandwidth: {name} must be (H,), got shape {tuple(th.shape)}")
    if counts.dim() not in (2, 3) or (counts.dim() == 3 and theta_0.shape[0] % counts.shape[1]):
        raise ValueError(f"adaptive_bandwidth: counts must be (B, T) or (B, G, T) with G dividing the "
                         f"{theta_0.shape[0]} heads, got shape {tuple(counts.shape)}")
    ctype = torch.float64 if theta_0.dtype == torch.float64 else torch.float32
    beta_0 = torch.exp(theta_0.to(ctype).clamp(max=10.0)).view(1, -1, 1, 1)
    beta_1 = torch.exp(theta_1.to(ctype).clamp(max=10.0)).view(1, -1, 1, 1)
    alpha = theta_alpha.to(ctype).abs().clamp(max=1.0).view(1, -1, 1, 1)
    n = counts.to(ctype)
    if n.dim() == 2:
        n = n[:, None, :, None]
    else:  # (B, G, T) -> (B, H, T, 1): each group's counts for its H/G heads
        B, G, T = n.shape
        n = n[:, :, None, :, None].expand(B, G, theta_0.shape[0] // G, T, 1).reshape(B, -1, T, 1)
    # n^α as exp(α·log n) on n ≥ 1 only: pow at n = 0 has a NaN gradient in α. masked_fill (not
    # where with a zero tensor) and addcmul: fewer ops, the same values and gradients.
    n_pow_alpha = torch.exp(alpha * torch.log(n.clamp(min=1.0))).masked_fill(n <= 0, 0.0)
    return torch.addcmul(beta_0, beta_1, n_pow_alpha).to(theta_0.dtype)
