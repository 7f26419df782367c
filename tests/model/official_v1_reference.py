"""Test-only stand-in for the official nanoMosaics ``MemoryMosaic`` (Memory Mosaics v1).

Written from the published parameter names, shapes and formulas of
facebookresearch/MemoryMosaics ``nanoMosaics/mosaic_model.py`` (spec section 2), deliberately
in the most literal form: explicit T x T decay and mask matrices, an explicit masked softmax,
Python loops over persistent-memory banks. It exists so the official-v1 importer can be tested
without the official code: its ``state_dict()`` has exactly the official keys, shapes and
registered buffers, and ``forward`` returns logits for every position (the official forward
returns every position when targets are given).

Not used by the package. Slow on purpose; use tiny shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The official code multiplies every learned log-scale scalar by 10 before use.
_EXP_SCALING = 10.0


@dataclass
class OfficialV1Config:
    """The official ``MemoryMosaicConfig`` fields (same names, same meaning)."""

    block_size: int = 32
    vocab_size: int = 67
    n_layer: int = 2
    n_head: int = 3
    n_embd: int = 24
    dropout: float = 0.0
    pmem_size: int = 10
    pmem_count: int = 1
    bias: bool = True
    # Official value in the current mosaic_model.py; an older revision used log(2**16 - 1).
    key_scale_max: float = 5.0


class RefLayerNorm(nn.Module):
    """LayerNorm over the last dim, eps 1e-5, optional bias (official ``LayerNorm``)."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + 1e-5) * self.weight
        return y if self.bias is None else y + self.bias


def _split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, C) -> (B, H, T, C/H); channel c belongs to head c // (C/H)."""
    b, t, c = x.shape
    return x.view(b, t, n_head, c // n_head).permute(0, 2, 1, 3)


def _unit(x: Tensor) -> Tensor:
    """x / (||x|| + 1e-10) over the last dim (the official normalisation)."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-10)


class RefLeakyAvg(nn.Module):
    """k̄_t = Σ_{s<=t} exp(-|10 θ_h| (t - s)) k̃_s, as an explicit (T, T) matrix.

    Buffer ``coef`` (block_size, block_size) holds -(t - s) on and below the diagonal and 0 above,
    exactly as the official buffer does (it appears in saved state dicts).
    """

    def __init__(self, block_size: int, n_head: int):
        super().__init__()
        pos = torch.arange(block_size, dtype=torch.float32)
        lag = pos[:, None] - pos[None, :]
        self.register_buffer("coef", torch.where(lag >= 0, -lag, torch.zeros_like(lag)))
        self.leaky_key_beta = nn.Parameter(torch.linspace(0.5, 5.0, n_head).view(1, n_head, 1, 1) / _EXP_SCALING)

    def forward(self, k: Tensor) -> Tensor:
        t = k.shape[2]
        lam = self.leaky_key_beta.abs() * _EXP_SCALING  # (1, H, 1, 1)
        lag = self.coef[:t, :t]  # -(t - s) below the diagonal
        decay = torch.exp(lag * lam) * torch.ones(t, t).tril()  # (1, H, T, T)
        return decay @ k


class RefKeyFeaturizer(nn.Module):
    """Official ``KeyFeatureExtractor``: W_k, leaky average, unit norm, exp(min(pow*10κ, max))."""

    def __init__(self, cfg: OfficialV1Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.key_scale_max = cfg.key_scale_max
        self.W_k = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.leaky_avg = RefLeakyAvg(cfg.block_size, cfg.n_head)
        self.key_scale = nn.Parameter(torch.full((1, cfg.n_head, 1, 1), 1.0 / _EXP_SCALING))

    def forward(self, x: Tensor, scale_pow: int = 1) -> Tensor:
        k = self.leaky_avg(_split_heads(self.W_k(x), self.n_head))
        log_scale = torch.clamp(scale_pow * _EXP_SCALING * self.key_scale, max=self.key_scale_max)
        return _unit(k) * torch.exp(log_scale)


class RefValFeaturizer(nn.Module):
    """Official ``ValFeatureExtractor``: v_t = c ṽ_t + (1 - c) ṽ_{t+1} (ṽ_T = 0), unit norm, exp(10ν)."""

    def __init__(self, cfg: OfficialV1Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.W_v = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.coef = nn.Parameter(torch.rand(1, cfg.n_head, 1, 1))
        self.val_scale = nn.Parameter(torch.full((1, cfg.n_head, 1, 1), -0.5 / _EXP_SCALING))

    def forward(self, x: Tensor) -> Tensor:
        v = _split_heads(self.W_v(x), self.n_head)  # (B, H, T, hs)
        v_next = torch.cat([v[:, :, 1:], torch.zeros_like(v[:, :, :1])], dim=2)
        mixed = self.coef * v + (1.0 - self.coef) * v_next
        return _unit(mixed) * torch.exp(_EXP_SCALING * self.val_scale)


def _merge_heads(y: Tensor) -> Tensor:
    b, h, t, d = y.shape
    return y.permute(0, 2, 1, 3).reshape(b, t, h * d)


class RefContextMem(nn.Module):
    """Official ``ContextMem``: y_t = Σ_{i<t} softmax_i(k_t·k_i) v_i, y_0 = 0, then c_proj.

    Buffer ``bias`` (1, 1, block_size, block_size) bool, strictly lower triangular, as official.
    """

    def __init__(self, cfg: OfficialV1Config):
        super().__init__()
        self.k_featurizer = RefKeyFeaturizer(cfg)
        self.v_featurizer = RefValFeaturizer(cfg)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        n = cfg.block_size
        self.register_buffer("bias", torch.ones(n, n).tril(diagonal=-1).bool().view(1, 1, n, n))

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        k, v = self.k_featurizer(x), self.v_featurizer(x)
        scores = k @ k.transpose(-1, -2)  # (B, H, T, T), scale 1
        visible = self.bias[:, :, :t, :t]
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores[:, :, 1:], dim=-1)  # row 0 sees nothing
        y = torch.cat([torch.zeros_like(v[:, :, :1]), weights @ v], dim=2)
        return self.c_proj(_merge_heads(y))


class RefPersistentMem(nn.Module):
    """Official ``PersistentMem``: mean over banks of softmax(k P_kᵀ) P_v, times exp(10ν'), c_proj."""

    def __init__(self, cfg: OfficialV1Config):
        super().__init__()
        hs = cfg.n_embd // cfg.n_head
        self.k_featurizer = RefKeyFeaturizer(cfg)
        shape = (cfg.pmem_count, 1, cfg.n_head, cfg.pmem_size, hs)
        self.P_k = nn.Parameter(torch.randn(shape) / math.sqrt(hs))
        self.P_v = nn.Parameter(torch.randn(shape) / math.sqrt(hs))
        self.out_scale = nn.Parameter(torch.full((1, cfg.n_head, 1, 1), -0.5 / _EXP_SCALING))
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        k = self.k_featurizer(x, scale_pow=2)  # the stored keys P_k carry no scale of their own
        banks = [torch.softmax(k @ pk.transpose(-1, -2), dim=-1) @ pv for pk, pv in zip(self.P_k, self.P_v)]
        y = torch.stack(banks).mean(dim=0) * torch.exp(_EXP_SCALING * self.out_scale)
        return self.c_proj(_merge_heads(y))


class RefBlock(nn.Module):
    def __init__(self, cfg: OfficialV1Config):
        super().__init__()
        self.ln_1 = RefLayerNorm(cfg.n_embd, cfg.bias)
        self.attn = RefContextMem(cfg)
        self.ln_2 = RefLayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = RefPersistentMem(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefMemoryMosaic(nn.Module):
    """Token embedding (no positions), blocks, final LayerNorm, lm_head tied to the embedding."""

    def __init__(self, cfg: OfficialV1Config):
        super().__init__()
        self.config = cfg
        self.mosaic = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                h=nn.ModuleList([RefBlock(cfg) for _ in range(cfg.n_layer)]),
                ln_f=RefLayerNorm(cfg.n_embd, cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.mosaic.wte.weight = self.lm_head.weight  # tied, so both names appear in state_dict

    def forward(self, idx: Tensor) -> Tensor:
        """idx (B, T) int64, T <= block_size -> logits (B, T, vocab_size) for every position."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}")
        x = self.mosaic.wte(idx)
        for block in self.mosaic.h:
            x = block(x)
        return self.lm_head(self.mosaic.ln_f(x))


@torch.no_grad()
def randomize_(model: RefMemoryMosaic, generator: torch.Generator) -> RefMemoryMosaic:
    """Fill every parameter with non-trivial values: nonzero biases, LayerNorm gains away from 1,
    leak rates of both signs (the official code uses |θ|), persistent key scales on both sides of
    the clamp,
    mixing coefficients partly outside [0, 1], distinct value/output scales per head."""

    def rand(shape, lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "leaky_key_beta":
            p.copy_(rand(p.shape, 0.02, 0.4) * torch.where(rand(p.shape, 0, 1) < 0.3, -1.0, 1.0))
        elif leaf == "key_scale" and ".attn." in name:
            # Contextual β = exp(2·10κ) up to e^3.6: large enough to matter, small enough that
            # fp32 rounding in two different kernels stays well below the 1e-4 logit tolerance.
            p.copy_(rand(p.shape, 0.005, 0.18))
        elif leaf == "key_scale":
            # Persistent memory uses pow=2: 2·10κ reaches the clamp at 5 for κ > 0.25, so heads
            # on both sides of the clamp are exercised.
            p.copy_(rand(p.shape, 0.005, 0.35))
        elif leaf == "coef" and p.dim() == 4:
            p.copy_(rand(p.shape, -0.2, 1.2))
        elif leaf in ("val_scale", "out_scale"):
            p.copy_(rand(p.shape, -0.1, 0.1))
        elif leaf in ("P_k", "P_v"):
            # Small P_k keeps the clamped persistent scores (up to e^5·|k·P_k|) well conditioned.
            std = (0.15 if leaf == "P_k" else 1.0) / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=generator) * std)
        elif p.dim() == 1 and leaf == "weight":  # LayerNorm gains
            p.copy_(rand(p.shape, 0.5, 1.5))
        elif p.dim() == 1:  # biases
            p.copy_(rand(p.shape, -0.1, 0.1))
        else:  # embeddings and linear weights
            p.copy_(torch.randn(p.shape, generator=generator) * (0.15 if name.endswith("wte.weight") else 0.2))
    return model
