"""Associative-memory retrieval: Gaussian kernel regression over visible pairs, via SDPA.

With unit-norm (or equal-norm) keys, softmax_i(-β‖k - k_i‖²) = softmax_i(β k·k_i): attention
with keys as queries, scale 1, and a visibility rule. Each rule is a causal attention over
shifted inputs (spec section 4), so torch's fused SDPA serves every memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .flex import BLOCK as FLEX_BLOCK, flex_recall, flex_supported
from .layout import SequenceLayout
from .precision import fp32_region, upcast
from .runs import banded_documents, consecutive_recall, shifted_recall


@dataclass(frozen=True)
class Visibility:
    """Which stored pairs a query at global position t may read.

    Pair i is visible iff same document, i <= t - delay, and (window is None or i >= t - window + 1).
    v1 contextual memory: delay=1, window=None. v2 short-term: delay=1, window=h.
    v2 long-term: delay=m, window=None.
    """

    delay: int = 1
    window: int | None = None

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise ValueError(f"Visibility.delay must be >= 0, got {self.delay}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"Visibility.window must be None or >= 1, got {self.window}")

    def visible_counts(self, layout: SequenceLayout) -> Tensor:
        """n_t: (B, T) int64 number of visible pairs for each query (closed form).

        Counts pairs of the full sequence (global positions), not only those held locally.
        Built once per layout (the layers of a micro-batch share it).
        """
        def build() -> Tensor:
            t = layout.positions
            lower = layout.doc_starts
            if self.window is not None:
                lower = torch.maximum(lower, t - self.window + 1)
            return (t - self.delay - lower + 1).clamp(min=0)
        return layout.derived(("visible_counts", self.delay, self.window), build)

    def mask(self, query_layout: SequenceLayout, key_layout: SequenceLayout) -> Tensor:
        """(B, 1, Tq, Tk) bool, True where the key is visible to the query."""
        tq = query_layout.positions[:, :, None]
        ti = key_layout.positions[:, None, :]
        visible = (query_layout.doc_starts[:, :, None] == key_layout.doc_starts[:, None, :]) & (ti <= tq - self.delay)
        if self.window is not None:
            visible = visible & (ti >= tq - self.window + 1)
        return visible[:, None]


def _is_consecutive_run(query_layout: SequenceLayout, key_layout: SequenceLayout) -> bool:
    """Queries and keys are the same consecutive positions (any number of documents).

    One layout object for both (the layers' case) answers from its cached Python facts; two
    objects are compared on the data (host syncs; decoding and tests only).
    """
    if not query_layout.consecutive:
        return False
    if key_layout is query_layout:
        return True
    qp, kp = query_layout.positions, key_layout.positions
    return qp.shape == kp.shape and bool(torch.equal(qp, kp) and torch.equal(query_layout.doc_starts,
                                                                              key_layout.doc_starts))


def _is_plain_shift(query_layout: SequenceLayout, key_layout: SequenceLayout) -> bool:
    """Queries and keys are the same consecutive run of one document: the shifted-SDPA case."""
    return _is_consecutive_run(query_layout, key_layout) and query_layout.uniform_documents


# Which kernel serves the rules that are not a plain shift (packed documents, context-parallel
# blocks, lse), per device type: "flex" (FlexAttention block masks, memory/flex.py) or "sdpa"
# (banded / masked SDPA). tools/bench_retrieval.py times both on a device and prints its pick.
# CPU: sdpa (FlexAttention has no CPU backward and runs eagerly at dense cost there).
# CUDA: flex, the only path without a (T, T) mask for packed documents; still to be confirmed by
# tools/gpu_check.py's retrieval benchmark on a GPU.
RECALL_BACKEND = {"cpu": "sdpa", "cuda": "flex"}


def _masked_recall(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, return_lse: bool):
    """Explicit-mask recall. mask (B,1,Tq,Tk). Empty rows: all keys allowed, output zeroed."""
    nonempty = mask.any(dim=-1, keepdim=True)  # (B,1,Tq,1)
    safe = mask | ~nonempty
    if not return_lse:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=1.0)
        return torch.where(nonempty, y, torch.zeros((), dtype=y.dtype, device=y.device))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    scores = scores.masked_fill(~safe, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # finite: every safe row has a key
    y = torch.matmul(torch.exp(scores - lse), v.float())
    y = torch.where(nonempty, y, torch.zeros((), dtype=y.dtype, device=y.device)).to(q.dtype)
    lse = torch.where(nonempty, lse, torch.full((), float("-inf"), device=lse.device)).squeeze(-1)
    return y, lse


def associative_recall(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    visibility: Visibility,
    query_layout: SequenceLayout | None = None,
    key_layout: SequenceLayout | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    fp32_scores: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """y_t = Σ_{i visible to t} softmax_i(q_t · k_i) v_i, with scale 1 (fold β into queries).

    queries: (B, H, Tq, D); keys, values: (B, H, Tk, D).
    Layouts None: both are the same contiguous single-document sequence (the fast shifted-SDPA
    path with no explicit mask where the rule allows it).
    Rows with nothing visible are exactly 0 (never NaN), gradients included.
    return_lse: also return the log-sum-exp of the visible scores, (B, H, Tq) fp32, -inf on
    empty rows, so partial results over key blocks can be merged (context parallelism).

    Layouts must be given both or neither. Given layouts that describe one consecutive run of a
    single document for both queries and keys also take the shifted fast path; a windowed rule
    over consecutive positions with several documents goes banded (no (Tq, Tk) mask) when the
    band spans more than runs.BANDED_MIN_BLOCKS query blocks. return_lse uses an
    explicit fp32 (Tq, Tk) score block (meant for context-parallel blocks); the output keeps the
    queries' dtype.
    backend: "flex" or "sdpa" for every case but the plain shift (None: RECALL_BACKEND of the
    device, sdpa where FlexAttention cannot run the call, e.g. a CPU backward, and for fewer
    queries than one of its blocks, e.g. a decoding step).
    fp32_scores: False leaves the kernels to autocast, as a transformer's attention (the GPT
    baseline's: scores scaled by 1/√d stay small); memories keep the default.
    """
    if queries.dim() != 4 or keys.dim() != 4 or values.dim() != 4:
        raise ValueError("associative_recall: queries, keys, values must be (B, H, T, D); got "
                         f"{tuple(queries.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    B, H, Tq, D = queries.shape
    Tk = keys.shape[2]
    if keys.shape[:2] != (B, H) or keys.shape[3] != D or values.shape[:3] != keys.shape[:3]:
        raise ValueError("associative_recall: shape mismatch: queries (B,H,Tq,D), keys (B,H,Tk,D), values "
                         f"(B,H,Tk,Dv) expected, got {tuple(queries.shape)}, {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}")
    if (query_layout is None) != (key_layout is None):
        raise ValueError("associative_recall: give both query_layout and key_layout, or neither")
    if query_layout is None:
        if Tq != Tk:
            raise ValueError(f"associative_recall: without layouts queries and keys are the same sequence, "
                             f"got Tq={Tq} != Tk={Tk}")
        plain = True
    else:
        if query_layout.positions.shape != (B, Tq) or key_layout.positions.shape != (B, Tk):
            raise ValueError(
                f"associative_recall: query_layout {tuple(query_layout.positions.shape)} / key_layout "
                f"{tuple(key_layout.positions.shape)} do not match (B, Tq)={(B, Tq)} / (B, Tk)={(B, Tk)}"
            )
        plain = _is_plain_shift(query_layout, key_layout)
    # Scores and softmax in fp32 whatever the autocast (memory/precision.py); the output goes
    # back to the queries' dtype, the lse stays fp32.
    flex = _use_flex(backend, queries, keys, values)
    if fp32_scores:
        with fp32_region(queries.device):
            result = _recall(upcast(queries), upcast(keys), upcast(values), visibility, query_layout, key_layout,
                             return_lse, plain, flex)
    else:
        result = _recall(queries, keys, values, visibility, query_layout, key_layout, return_lse, plain, flex)
    if return_lse:
        return result[0].to(queries.dtype), result[1]
    return result.to(queries.dtype)


def _use_flex(backend: str | None, *tensors: Tensor) -> bool:
    device = tensors[0].device
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    supported = flex_supported(device, needs_grad)
    if backend is None:
        # Fewer queries than one FlexAttention block (a decoding step: one query against the
        # cache) leave no block to skip, and each new key length would compile another kernel
        # (its shapes are static): there the explicit (Tq, Tk) mask is small.
        auto = RECALL_BACKEND.get(device.type, "sdpa") == "flex"
        return auto and supported and tensors[0].shape[2] >= FLEX_BLOCK
    if backend not in ("flex", "sdpa"):
        raise ValueError(f"associative_recall: backend must be 'flex', 'sdpa' or None, got {backend!r}")
    if backend == "flex" and not supported:
        raise ValueError(f"associative_recall: FlexAttention cannot run this call on {device.type} "
                         f"({'no backward there' if needs_grad else 'not importable'}); use backend='sdpa'")
    return backend == "flex"


def _recall(queries: Tensor, keys: Tensor, values: Tensor, visibility: Visibility,
            query_layout: SequenceLayout | None, key_layout: SequenceLayout | None, return_lse: bool,
            plain: bool, flex: bool) -> Tensor | tuple[Tensor, Tensor]:
    """associative_recall's path choice, on validated inputs."""
    B, H, Tq, _ = queries.shape
    Tk = keys.shape[2]
    if not return_lse and plain:
        return shifted_recall(queries, keys, values, visibility.delay, visibility.window)
    if Tk == 0:
        y = queries.new_zeros(B, H, Tq, values.shape[-1])
        lse = torch.full((B, H, Tq), float("-inf"), device=queries.device)
        return (y, lse) if return_lse else y
    if query_layout is None:
        query_layout = key_layout = SequenceLayout.contiguous(B, Tq, device=queries.device)
    if flex:  # every other rule: one block-sparse kernel, no (Tq, Tk) tensor
        return flex_recall(queries, keys, values, visibility.delay, visibility.window, query_layout, key_layout,
                           return_lse)
    if not return_lse and _is_consecutive_run(query_layout, key_layout):
        d, w = visibility.delay, visibility.window
        y = None if w is None else banded_documents(queries, keys, values, query_layout, d, w)
        if y is None:
            y = consecutive_recall(queries, keys, values, query_layout, d, w)
        if y is not None:
            return y
    mask = visibility.mask(query_layout, key_layout)
    return _masked_recall(queries, keys, values, mask, return_lse)


def merge_partial_recalls(
    outputs: list[Tensor], lses: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """Merge recalls over disjoint key blocks by the online-softmax rule (fp32).

    outputs[j]: (B, H, Tq, D), lses[j]: (B, H, Tq). Empty rows (all -inf) merge to exactly 0.
    Returns (output in outputs[0]'s dtype, lse fp32); merging merged results is associative.
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(f"merge_partial_recalls: need as many outputs as lses (>= 1), got {len(outputs)} "
                         f"and {len(lses)}")
    lse = torch.stack([l.float() for l in lses])  # (J,B,H,Tq)
    # The result is invariant to the reference point, so it carries no gradient.
    top = lse.amax(dim=0).detach()
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(lse - top)  # 0 for empty blocks
    total = weights.sum(dim=0)
    has_any = total > 0
    total_safe = torch.where(has_any, total, torch.ones_like(total))
    y = sum(w[..., None] * o.float() for w, o in zip(weights, outputs)) / total_safe[..., None]
    merged_lse = torch.where(has_any, top + torch.log(total_safe), torch.full_like(total, float("-inf")))
    return y.to(outputs[0].dtype), merged_lse
