"""Naive, obviously correct float64 references for the memory math. Tests only.

Each function follows the defining formula literally: Python loops over positions, or full
(T, T) matrices. Slow and memory hungry by design; never call them from model code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

f64 = torch.float64


def layout_from_tokens(tokens: Tensor, eod_token: int) -> tuple[Tensor, Tensor]:
    """(positions, doc_starts), (B, T) int64: a document starts at 0 and after every EOD."""
    B, T = tokens.shape
    positions = torch.zeros(B, T, dtype=torch.int64)
    doc_starts = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        start = 0
        for t in range(T):
            if t > 0 and int(tokens[b, t - 1]) == eod_token:
                start = t
            positions[b, t] = t
            doc_starts[b, t] = start
    return positions, doc_starts


def recurrence(
    inputs: Tensor,
    log_decay: Tensor,
    log_gain: Tensor | None = None,
    resets: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> Tensor:
    """h_t = exp(log_decay_t)·h_{t-1}·(1 - reset_t) + exp(log_gain_t)·x_t, step by step.

    inputs (B,H,T,D); gates broadcastable to (B,H,T,1); initial_state (B,H,D) materialized.
    Returns h (B,H,T,D) float64 (differentiable in every argument).
    """
    B, H, T, D = inputs.shape
    a = log_decay.to(f64).expand(B, H, T, 1)
    g = torch.zeros(B, H, T, 1, dtype=f64) if log_gain is None else log_gain.to(f64).expand(B, H, T, 1)
    h = torch.zeros(B, H, D, dtype=f64) if initial_state is None else initial_state.to(f64)
    out = []
    for t in range(T):
        keep = torch.ones(B, 1, 1, dtype=f64)
        if resets is not None:
            keep = (~resets[:, t]).to(f64).view(B, 1, 1)
        h = torch.exp(a[:, :, t]) * h * keep + torch.exp(g[:, :, t]) * inputs[:, :, t].to(f64)
        out.append(h)
    return torch.stack(out, dim=2)


def peek_values(
    values: Tensor,
    mix: Tensor,
    resets: Tensor | None = None,
    next_value: Tensor | None = None,
    next_resets: Tensor | None = None,
) -> Tensor:
    """v_t = mix·ṽ_t + (1 - mix)·ṽ_{t+1}, ṽ_{t+1} = 0 past the end or at a document start."""
    B, H, T, D = values.shape
    values = values.to(f64)
    mix = mix.to(f64)
    out = []
    for t in range(T):
        if t + 1 < T:
            nxt = values[:, :, t + 1]
            starts = torch.zeros(B, dtype=torch.bool) if resets is None else resets[:, t + 1]
        else:
            nxt = torch.zeros(B, H, D, dtype=f64) if next_value is None else next_value[:, :, 0].to(f64)
            starts = torch.zeros(B, dtype=torch.bool) if next_resets is None else next_resets
        nxt = nxt * (~starts).to(f64).view(B, 1, 1)
        out.append(mix[..., 0] * values[:, :, t] + (1 - mix[..., 0]) * nxt)
    return torch.stack(out, dim=2)


def visibility_mask(
    delay: int, window: int | None, q_positions: Tensor, q_docs: Tensor, k_positions: Tensor, k_docs: Tensor
) -> Tensor:
    """(B, 1, Tq, Tk) bool by the rule: same document, i <= t - delay, i >= t - window + 1."""
    B, Tq = q_positions.shape
    Tk = k_positions.shape[1]
    mask = torch.zeros(B, 1, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for a in range(Tq):
            t, doc = int(q_positions[b, a]), int(q_docs[b, a])
            for c in range(Tk):
                i = int(k_positions[b, c])
                ok = int(k_docs[b, c]) == doc and i <= t - delay
                if window is not None:
                    ok = ok and i >= t - window + 1
                mask[b, 0, a, c] = ok
    return mask


def recall(queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Full-matrix softmax over the visible keys, float64. Returns (y, lse); empty rows 0 / -inf."""
    q, k, v = queries.to(f64), keys.to(f64), values.to(f64)
    B, H, Tq, _ = q.shape
    scores = torch.matmul(q, k.transpose(-1, -2))
    ys, lses = [], []
    for a in range(Tq):
        row_mask = mask[:, :, a].expand(B, H, -1)  # (B,H,Tk)
        s = scores[:, :, a]
        lse = torch.where(row_mask, s, torch.full_like(s, float("-inf"))).logsumexp(dim=-1)
        p = torch.where(row_mask, torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), 0.0)
        ys.append(torch.matmul(p.unsqueeze(-2), v).squeeze(-2))
        lses.append(lse)
    return torch.stack(ys, dim=2), torch.stack(lses, dim=2)


def bandwidth(theta_0: Tensor, theta_1: Tensor, theta_alpha: Tensor, counts: Tensor) -> Tensor:
    """β[b,h,t] = exp(min(θ₀,10)) + exp(min(θ₁,10))·n^min(|θ_α|,1), n^α = 0 at n = 0; (B,H,T,1)."""
    B, T = counts.shape
    H = theta_0.shape[0]
    out = torch.zeros(B, H, T, 1, dtype=f64)
    for b in range(B):
        for h in range(H):
            b0 = math.exp(min(float(theta_0[h]), 10.0))
            b1 = math.exp(min(float(theta_1[h]), 10.0))
            alpha = min(abs(float(theta_alpha[h])), 1.0)
            for t in range(T):
                n = int(counts[b, t])
                out[b, h, t, 0] = b1 * (n**alpha if n > 0 else 0.0) + b0
    return out


def norm(z: Tensor, eps: float = 0.0) -> Tensor:
    """z / (‖z‖ + eps) over the last dimension (eps = 0: pre-divided by max|z| so tiny z don't underflow)."""
    if eps == 0.0:
        z = z / z.abs().amax(dim=-1, keepdim=True)
    return z / (z.norm(dim=-1, keepdim=True) + eps)
