"""Slow, obviously correct float64 re-computations of one Mosaic block from its weights.

Everything is written from the formulas of the spec (sections 2-3) with explicit (T, T)
matrices and documents given as a per-token document id; nothing here calls model or memory
code. ``w`` is a layer's state_dict (names as in the model contract), x is (B, T, d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

f64 = torch.float64


def heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, H·hs) -> (B, H, T, hs)."""
    B, T, _ = x.shape
    return x.view(B, T, num_heads, -1).transpose(1, 2)


def unheads(y: Tensor) -> Tensor:
    B, H, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, H * hs)


def linear(x: Tensor, w: dict, name: str) -> Tensor:
    bias = w.get(f"{name}.bias")
    return F.linear(x, w[f"{name}.weight"].to(f64), None if bias is None else bias.to(f64))


def same_doc(doc: Tensor) -> Tensor:
    """(B, 1, T, T) bool: tokens t and s are in the same document."""
    return (doc[:, :, None] == doc[:, None, :]).unsqueeze(1)


def lags(T: int) -> Tensor:
    """(T, T) float64 t - s."""
    r = torch.arange(T, dtype=f64)
    return r[:, None] - r[None, :]


def norm(z: Tensor, eps: float) -> Tensor:
    return z / (z.norm(dim=-1, keepdim=True) + eps)


def masked_recall(scores: Tensor, values: Tensor, visible: Tensor) -> Tensor:
    """Σ_visible softmax(scores) v, rows with nothing visible = 0."""
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ values


def peek(vt: Tensor, mix: Tensor, doc: Tensor) -> Tensor:
    """v_t = c ṽ_t + (1-c) ṽ_{t+1}; ṽ_{t+1} = 0 at the sequence end or in another document."""
    nxt = torch.zeros_like(vt)
    nxt[:, :, :-1] = vt[:, :, 1:]
    same = (doc[:, 1:] == doc[:, :-1]).to(f64)
    nxt[:, :, :-1] *= same[:, None, :, None]
    c = mix.to(f64).view(1, -1, 1, 1)
    return c * vt + (1 - c) * nxt


def v1_keys(x: Tensor, w: dict, p: str, H: int, doc: Tensor, pow_: int, scale_max: float) -> Tensor:
    raw = heads(linear(x, w, f"{p}.linear_key"), H)
    lam = (10 * w[f"{p}.leak"].to(f64)).abs().view(1, H, 1, 1)
    T = x.shape[1]
    lag = lags(T)
    coef = torch.exp(-lam * lag.clamp(min=0)) * ((lag >= 0) & same_doc(doc))  # (B, H, T, T)
    k = norm(coef @ raw, 1e-10)
    return k * torch.exp((pow_ * 10 * w[f"{p}.key_scale"].to(f64)).clamp(max=scale_max)).view(1, H, 1, 1)


def v1_values(x: Tensor, w: dict, p: str, H: int, doc: Tensor) -> Tensor:
    v = norm(peek(heads(linear(x, w, f"{p}.linear_value"), H), w[f"{p}.mix"], doc), 1e-10)
    return v * torch.exp(10 * w[f"{p}.value_scale"].to(f64)).view(1, H, 1, 1)


def v1_block(x: Tensor, w: dict, H: int, doc: Tensor, eps: float = 1e-5, scale_max: float = 5.0) -> Tensor:
    """Official v1 block: x += CM(LN₁x); x += PM(LN₂x)."""
    x = x.to(f64)
    T = x.shape[1]

    def ln(z, name):
        b = w.get(f"{name}.bias")
        return F.layer_norm(z, z.shape[-1:], w[f"{name}.weight"].to(f64), None if b is None else b.to(f64), eps)

    h = ln(x, "input_layernorm")
    k = v1_keys(h, w, "contextual_memory.key_extractor", H, doc, 1, scale_max)
    v = v1_values(h, w, "contextual_memory.value_extractor", H, doc)
    visible = (lags(T) >= 1) & same_doc(doc)  # pairs i < t of the same document
    y = masked_recall(k @ k.transpose(-1, -2), v, visible)
    x = x + linear(unheads(y), w, "contextual_memory.linear_proj")

    h = ln(x, "pre_persistent_layernorm")
    k = v1_keys(h, w, "persistent_memory.key_extractor", H, doc, 2, scale_max)
    mk, mv = w["persistent_memory.memory_keys"].to(f64), w["persistent_memory.memory_values"].to(f64)
    y = torch.softmax(k @ mk.transpose(-1, -2).unsqueeze(0), dim=-1) @ mv.unsqueeze(0)
    y = y * torch.exp(10 * w["persistent_memory.output_scale"].to(f64)).view(1, H, 1, 1)
    return x + linear(unheads(y), w, "persistent_memory.linear_proj")


def v2_memory(x: Tensor, w: dict, p: str, H: int, doc: Tensor, delay: int, window: int | None) -> Tensor:
    """One v2 memory's head outputs (B, H, T, hs)."""
    T = x.shape[1]
    raw = heads(linear(x, w, f"{p}.key_extractor.linear_key"), H)
    gain = linear(x, w, f"{p}.key_extractor.linear_gate").transpose(1, 2)  # (B, H, T) log g_t
    log_lam = -linear(x, w, f"{p}.key_extractor.linear_decay").abs().transpose(1, 2)
    cum = log_lam.cumsum(-1)  # Π_{r=s+1..t} λ_r = exp(cum_t - cum_s)
    lag = lags(T)
    logits = cum[..., :, None] - cum[..., None, :] + gain[..., None, :]
    coef = torch.exp(logits.masked_fill(~((lag >= 0) & same_doc(doc)), float("-inf")))
    k = norm(coef @ raw, 0.0)

    theta = w[f"{p}.value_extractor.value_scale"].to(f64)
    v = norm(peek(heads(linear(x, w, f"{p}.value_extractor.linear_value"), H), w[f"{p}.value_extractor.mix"], doc), 1e-10)
    v = v * torch.exp(theta.clamp(-15, 15)).view(1, H, 1, 1)

    visible = (lag >= delay) & same_doc(doc)
    if window is not None:
        visible &= lag <= window - 1
    n = visible.sum(-1, keepdim=True).to(f64)  # (B, 1, T, 1)
    b0 = torch.exp(w[f"{p}.bandwidth_theta0"].to(f64).clamp(max=10)).view(1, H, 1, 1)
    b1 = torch.exp(w[f"{p}.bandwidth_theta1"].to(f64).clamp(max=10)).view(1, H, 1, 1)
    alpha = w[f"{p}.bandwidth_theta_alpha"].to(f64).abs().clamp(max=1).view(1, H, 1, 1)
    beta = b1 * torch.where(n > 0, n.clamp(min=1) ** alpha, torch.zeros_like(n)) + b0
    return masked_recall(beta * (k @ k.transpose(-1, -2)), v, visible)


def v2_block(x: Tensor, w: dict, H: int, doc: Tensor, delay: int, window: int, eps: float = 1e-5) -> Tensor:
    """v2 block: x += W_o[STM(Nx); LTM(Nx)] (per-head interleaved); x += W₂(SiLU(W₁Nx) ⊙ W₃Nx)."""
    x = x.to(f64)

    def rms(z, name):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * w[f"{name}.weight"].to(f64)

    h = rms(x, "input_layernorm")
    short = v2_memory(h, w, "memory.short_term", H, doc, 1, window)
    long = v2_memory(h, w, "memory.long_term", H, doc, delay, None)
    y = torch.cat([short, long], dim=-1)  # per head [short_h ; long_h]
    x = x + linear(unheads(y), w, "memory.linear_proj")

    h = rms(x, "pre_mlp_layernorm")
    w1, w3 = w["mlp.linear_fc1.weight"].to(f64).chunk(2, dim=0)
    return x + F.linear(F.silu(F.linear(h, w1)) * F.linear(h, w3), w["mlp.linear_fc2.weight"].to(f64))
