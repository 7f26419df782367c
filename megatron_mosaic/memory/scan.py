"""Gated linear recurrences (the key extractors' leaky averages) as O(T·D) scans.

h_t = exp(log_decay_t) · h_{t-1} · [t is not a document start] + exp(log_gain_t) · x_t

v1: log_decay = -λ_h (constant per head), log_gain = 0.
v2: log_decay_t = -|W_λ x_t|, log_gain_t = W_g x_t (unbounded: computed in log space).

Algorithm (chunked, log space). Split T into chunks of C. Inside a chunk,
h_t = Σ_{s≤t, same segment} exp(g_s + A_t - A_s) x_s + exp(A_t) h_in   (A = in-chunk cumsum of
log_decay, "same segment" = no reset in (s, t], the carry term only if no reset in [start, t]).
Every row is stored as scaled · exp(max log weight), so the largest weight is exactly 1 and no
exp overflows whatever the gains. The chunk-end states obey the same recurrence one level up
(decay = the chunk's total decay, gain = the chunk-end log scale), so they are computed by the
same function recursively: memory B·H·T·(C + D), no T×T matrix, depth log_C(T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import additive_mask, shape_constant
from .precision import fp32_region


# Chunk length C. Per chunk the scan builds a C×C weight block, so the work is O(T·C·D) plus a
# recursion of depth log_C(T). On CPU, fwd+bwd of the v2 keys (scan and norm, 8 heads of 32,
# one thread; medians of interleaved runs) takes, relative to C=16: C=8 0.77-0.95 at T=256 and
# 0.81-0.84 at T=2048; C=4 and C=12 no better than 16; C=32 1.1-1.7, C=64 2.2-2.6 (the C×C
# blocks outgrow the savings of a shallower recursion). Any C >= 1 gives the same recurrence.
DEFAULT_CHUNK_SIZE = 8
# Chunk ends (the upper levels) go in one chunk up to this many: at T = 256, C = 8 that is depth
# 2 instead of 3 (32 ends: one 32×32 block per head), ~40 fewer small ops per fwd+bwd.
UPPER_CHUNK_MAX = 64


@dataclass
class RecurrenceState:
    """A recurrence state kept as value · exp(log_scale) so unbounded gains never overflow.

    value: (B, H, D); log_scale: (B, H, 1).
    """

    value: Tensor
    log_scale: Tensor

    def materialize(self) -> Tensor:
        """value · exp(log_scale), (B, H, D); may overflow for extreme v2 gains (tests only)."""
        return self.value * torch.exp(self.log_scale)


def _log_combine(v1: Tensor, l1: Tensor, v2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """v1·e^l1 + v2·e^l2 as (v, l); l1 must be finite, l2 may be -inf."""
    l = torch.maximum(l1, l2).detach()  # a reference point: see _scan_fp32's m
    # addcmul: the product and sum in one op (eager, each op is a dispatch and a pass over memory)
    return torch.addcmul(v1 * torch.exp(l1 - l), v2, torch.exp(l2 - l)), l


@shape_constant(maxsize=16)
def _triangles(C: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """C×C masks of one chunk: ``below`` fp32 1.0 where u > s (the a_u a weight w[t, s] sums),
    ``visible`` bool where s <= t and ``visible_bias`` its additive form (-inf where s > t). A
    multiply and an add of these cost less than masked_fill, whose backward broadcasts the bool
    mask over every chunk again."""
    visible = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    return (~visible).t().float(), visible, additive_mask(visible)


def _scan_fp32(
    x: Tensor, a: Tensor, g: Tensor, resets: Tensor | None, init: tuple[Tensor, Tensor] | None, chunk: int
) -> tuple[Tensor, Tensor]:
    """fp32 core. x (B,H,T,D), a/g (B,H,T,1), resets (B,T) or None, init ((B,H,D), (B,H,1)) or None.

    Returns (scaled (B,H,T,D), log_scale (B,H,T,1)).
    """
    B, H, T, D = x.shape
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        g = torch.nn.functional.pad(g, (0, 0, 0, pad))
        if resets is not None:
            resets = torch.nn.functional.pad(resets, (0, pad))
    x = x.view(B, H, N, C, D)
    g = g.view(B, H, N, C, 1)
    if resets is not None:
        r = resets.view(B, 1, N, C, 1)
        # The decay at a reset multiplies a dropped state: zero it so cumsums stay finite.
        a = a.view(B, H, N, C, 1).masked_fill(r, 0.0)
        seg = r.cumsum(dim=3, dtype=torch.int32)  # (B,1,N,C,1): number of resets in [chunk start, t]
    else:
        a = a.view(B, H, N, C, 1)
        seg = None
    A = a.cumsum(dim=3)  # (B,H,N,C,1)

    # Intra-chunk weights log w[t, s] = g_s + Σ_{s<u≤t} a_u, s ≤ t, same segment. The segment sum
    # is summed directly (not A_t - A_s): no cancellation error when |A| is large (upper levels).
    below, visible, visible_bias = _triangles(C, x.device)  # [u, s]: u > s; [t, s]: s <= t
    seg_sum = (a * below).cumsum(dim=-2)  # a_u where u > s, 0 elsewhere
    logw = seg_sum + g.transpose(-1, -2)  # (B,H,N,C,C)
    if seg is not None:  # visible only within t's segment
        with torch.no_grad():
            visible_bias = additive_mask(visible & (seg == seg.transpose(-1, -2)), logw.dtype)
    logw = logw + visible_bias  # -inf where hidden: exp gives 0 and a zero gradient
    # m: finite (the diagonal g_t is always visible). A reference point, detached: h = scaled·e^m
    # whatever m is, and every consumer (products, Norm(scaled), the recursion) depends on h alone,
    # so m's own gradient path adds exactly zero (amax's backward was ~6 full-size ops).
    m = logw.detach().amax(dim=-1, keepdim=True)
    scaled = torch.matmul(torch.exp(logw - m), x)  # (B,H,N,C,D)

    # State entering each chunk: init for chunk 0, the previous chunk's end state after that.
    if N > 1:
        chunk_resets = None if seg is None else (seg[:, 0, :, -1, 0] > 0)  # (B,N)
        # The chunk ends in one chunk when they are few (their C×C block is small, and every
        # level costs the same number of ops whatever its size); else chunks of >= 2 so the
        # recursion shrinks.
        upper = N if N <= UPPER_CHUNK_MAX else max(chunk, 2)
        end_v, end_l = _scan_fp32(scaled[:, :, :, -1], A[:, :, :, -1], m[:, :, :, -1], chunk_resets, init, upper)
        in_v, in_l = end_v[:, :, :-1], end_l[:, :, :-1]  # (B,H,N-1,·)
        if init is None:  # chunk 0 starts from a zero state (log scale -inf); pad: one op each
            in_v = torch.nn.functional.pad(in_v, (0, 0, 1, 0))
            in_l = torch.nn.functional.pad(in_l, (0, 0, 1, 0), value=float("-inf"))
        else:
            in_v = torch.cat([init[0].unsqueeze(2), in_v], dim=2)
            in_l = torch.cat([init[1].unsqueeze(2), in_l], dim=2)
    elif init is not None:
        in_v, in_l = init[0].unsqueeze(2), init[1].unsqueeze(2)  # (B,H,1,·)
    else:
        in_v = None
    if in_v is not None:
        carry_l = A + in_l.unsqueeze(3)  # (B,H,N,C,1)
        if seg is not None:
            carry_l = carry_l.masked_fill(seg > 0, float("-inf"))
        scaled, m = _log_combine(scaled, m, in_v.unsqueeze(3), carry_l)
    scaled, m = scaled.reshape(B, H, N * C, D), m.reshape(B, H, N * C, 1)
    if pad:  # a slice's backward zero-fills and copies the whole tensor: only when it cuts
        scaled, m = scaled[:, :, :T], m[:, :, :T]
    return scaled, m


_COMPILED_CORE = None


def compiled_core():
    """``_scan_fp32`` through torch.compile, built on first use (one process-wide cache of graphs).

    Eager, the chunked scan is ~200 small kernels per call (pads, cumsums, masks, the recursion
    over chunk ends): launch-bound on a GPU. Compiled, inductor fuses the elementwise work
    around the chunk matmuls into a few kernels (the recursion, whose depth depends only on T,
    is unrolled into the graph). The same function computes the same values, so the eager
    chunked scan stays the reference (tests/memory/test_compiled_scan.py compares them)."""
    global _COMPILED_CORE
    if _COMPILED_CORE is None:
        _COMPILED_CORE = torch.compile(_scan_fp32)
    return _COMPILED_CORE


def _expand_gate(name: str, gate: Tensor | None, B: int, H: int, T: int) -> Tensor | None:
    if gate is None:
        return None
    try:
        return gate.to(torch.float32).expand(B, H, T, 1)
    except RuntimeError as e:
        raise ValueError(f"linear_recurrence: {name} of shape {tuple(gate.shape)} is not broadcastable "
                         f"to (B, H, T, 1) = {(B, H, T, 1)}") from e


def linear_recurrence(
    inputs: Tensor,
    log_decay: Tensor,
    log_gain: Tensor | None = None,
    resets: Tensor | None = None,
    initial_state: RecurrenceState | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compiled: bool | None = None,
) -> tuple[Tensor, Tensor, RecurrenceState]:
    """Run h_t = exp(log_decay_t)·h_{t-1}·(1 - reset_t) + exp(log_gain_t)·x_t over T.

    inputs:        (B, H, T, D)
    log_decay:     broadcastable to (B, H, T, 1), values <= 0
    log_gain:      broadcastable to (B, H, T, 1), any real; None means 0
    resets:        (B, T) bool, True where h_{t-1} is dropped (document start); None: no resets
    initial_state: h_{-1}; None means zeros. A reset at t=0 drops it.
    Returns (scaled, log_scale, final_state) with h_t = scaled_t · exp(log_scale_t):
    scaled (B, H, T, D) in the inputs' dtype, log_scale (B, H, T, 1) fp32, final_state = h_{T-1}.
    log_scale is a reference point and carries no gradient: differentiate h (or Norm(scaled)),
    not the two parts apart; those gradients are exact.
    Memory O(B·H·T·D) (chunked: no T×T matrix); computed in fp32.

    The final state is fp32 (it is carried across chunks/ranks). log_scale_t is the largest log
    weight of row t, so max_s |weight| = 1 and ‖scaled_t‖ ≤ Σ_s ‖x_s‖: never inf for finite input.

    compiled: run the chunked core through torch.compile (``compiled_core``); None (default)
    means on CUDA only: the eager chunked scan is the CPU default and the reference.
    """
    if inputs.dim() != 4:
        raise ValueError(f"linear_recurrence: inputs must be (B, H, T, D), got shape {tuple(inputs.shape)}")
    if chunk_size < 1:
        raise ValueError(f"linear_recurrence: chunk_size must be >= 1, got {chunk_size}")
    B, H, T, D = inputs.shape
    if resets is not None and resets.shape != (B, T):
        raise ValueError(f"linear_recurrence: resets must be (B, T) = {(B, T)}, got {tuple(resets.shape)}")
    a = _expand_gate("log_decay", log_decay, B, H, T)
    g = _expand_gate("log_gain", log_gain, B, H, T)
    if g is None:
        g = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=inputs.device).expand(B, H, T, 1)
    init = None
    if initial_state is not None:
        if initial_state.value.shape != (B, H, D) or initial_state.log_scale.shape != (B, H, 1):
            raise ValueError(
                f"linear_recurrence: initial_state must be value (B, H, D) = {(B, H, D)} and log_scale "
                f"(B, H, 1), got {tuple(initial_state.value.shape)} and {tuple(initial_state.log_scale.shape)}"
            )
        init = (initial_state.value.to(torch.float32), initial_state.log_scale.to(torch.float32))
    use_compiled = inputs.is_cuda if compiled is None else compiled
    if resets is not None:
        resets = resets.to(torch.bool)
    elif use_compiled:
        # One compiled graph for micro-batches with and without document starts (no resets is
        # an all-False mask, the same values): a second graph would stall training for another
        # compilation, tens of seconds, the first time a micro-batch holds a single document.
        resets = torch.zeros(B, T, dtype=torch.bool, device=inputs.device)
    with fp32_region(inputs.device):  # exp'd log weights keep their bits under autocast too
        core = compiled_core() if use_compiled else _scan_fp32
        scaled, log_scale = core(inputs.to(torch.float32), a, g, resets, init, chunk_size)
    final = RecurrenceState(scaled[:, :, -1], log_scale[:, :, -1])
    return scaled.to(inputs.dtype), log_scale, final
