"""Whole models under context parallelism equal the unsplit model built from the same weights.

Two spawns carry every multi-process check (spawning is the expensive part):
- 2 ranks: the CP=2 memory primitives (tests/parallel/test_cp_memory.py), then v1, v2 (window
  and delay crossing chunk boundaries; window and delay longer than the sequence) and the GPT
  baseline at CP=2 against CP=1, with document masking: per-token losses, the full-sequence
  mean, and every parameter gradient (summed over the CP group, as the DP×CP reduction does).
- 4 ranks: the CP=4 memory primitives (a ring with 3 steps), then CP=2 × TP=2 v1, v2 and GPT against
  the unsplit model.
The CP=1 references are computed in the same processes first (parallel state re-initialised).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mosaic.model import MosaicModel, build_gpt_baseline
from megatron_mosaic.parallel import (
    ChunkPlan, context_parallel_token_mean, gather_from_context_parallel, slice_batch_for_cp_rank,
)
from tests.distributed import run_distributed
from tests.model.helpers import (
    EOD, VOCAB, gather_full, logical_grads, logical_parameters, packed_tokens, randomize_per_head_, shard_of,
    tiny_config, tiny_gpt_config,
)
from tests.parallel import test_cp_memory
from tests.parallel.cp_checks import assert_close

RTOL = 1e-5  # fp32: losses relative to their largest entry, gradients to the model's largest
# Per gradient tensor, relative to its own largest entry. fp32 noise alone reaches ~1e-5 here:
# two equivalent single-device summation orders (SDPA vs the tiled ring at CP=1) already differ
# by 8e-6 on the bandwidth θ gradients, which are sums of cancelling per-token terms; a wrong
# gradient is off by O(1).
TENSOR_RTOL = 1e-4
# kind -> (model family, config overrides, long-term delay m). T = 16, so a CP=2 chunk is 4
# tokens: the window 5 and the delay 6 reach across chunks; 100 exceeds the sequence.
KINDS = {
    "v1": (1, {}, None),
    "v2": (2, dict(short_term_window=5), 6),
    "v2 long h, m": (2, dict(short_term_window=100), 100),
    "gpt": (None, {}, None),
}


def _build(kind: str, tp: int = 1, cp: int = 1):
    version, overrides, _ = KINDS[kind]
    torch.manual_seed(0)
    if version is None:
        return build_gpt_baseline(tiny_gpt_config(tp), VOCAB, eod_token_id=EOD)
    cfg = tiny_config(version, tp=tp, context_parallel_size=cp, **overrides)
    return MosaicModel(cfg, VOCAB, eod_token_id=EOD)


def _batch() -> dict:
    tokens = packed_tokens(torch.Generator().manual_seed(0))  # EODs at 5, 11 (row 0), 8 (row 1)
    return {"tokens": tokens, "labels": tokens.roll(-1, dims=1)}


def _references(kinds: list[str]) -> dict:
    """CP=1 per-token losses, weights and gradients (same on every rank)."""
    parallel_state.initialize_model_parallel()
    refs = {}
    batch = _batch()
    for kind in kinds:
        model = _build(kind)
        randomize_per_head_(model, torch.Generator().manual_seed(5))  # e.g. |θ| = 0 has no gradient
        delay = KINDS[kind][2]
        per_token = model(batch["tokens"], labels=batch["labels"], long_term_delay=delay)
        per_token.mean().backward()
        # Fused projections seen as their separate linears: TP slicing applies part by part.
        refs[kind] = {
            "loss": per_token.detach(),
            "params": {n: p.detach().clone() for n, p in logical_parameters(model).items()},
            "grads": {n: g.detach().clone() for n, g in logical_grads(model).items() if g is not None},
        }
    parallel_state.destroy_model_parallel()
    return refs


def _check_cp_model(kind: str, ref: dict, tp: int, cp: int) -> dict:
    """Asserts the CP model equals the reference; returns the worst relative errors seen."""
    tp_group, cp_group = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_context_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    model = _build(kind, tp=tp, cp=cp)
    params = logical_parameters(model)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard_of(name, p, ref["params"][name], tp_rank, tp))
    batch = slice_batch_for_cp_rank(_batch(), eod_token_id=EOD)
    per_token = model(batch["tokens"], labels=batch["labels"], layout=batch["layout"], long_term_delay=KINDS[kind][2])
    loss, full_mean = context_parallel_token_mean(per_token, None, cp_group)
    loss.backward()
    plan = ChunkPlan(batch["layout"].total_length, cp, parallel_state.get_context_parallel_rank())
    loss_err = assert_close(f"{kind} per-token loss", gather_from_context_parallel(per_token.detach(), plan, cp_group),
                            ref["loss"], RTOL)
    assert_close(f"{kind} mean loss", full_mean, ref["loss"].mean(), RTOL)
    names, worst_model, worst_tensor = set(), 0.0, 0.0
    model_scale = max(g.abs().max().item() for g in ref["grads"].values())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{kind}: {name} got no gradient"
    for name, local in logical_grads(model).items():
        p = params[name]  # the (logical) parameter: its TP attributes say how to gather
        grad = local.detach().clone()
        dist.all_reduce(grad, group=cp_group)
        grad = gather_full(name, p, grad, tp_group)
        want = ref["grads"][name]
        worst_tensor = max(worst_tensor, assert_close(f"{kind} grad {name}", grad, want, TENSOR_RTOL))
        err = (grad - want).abs().max().item()
        assert err <= RTOL * model_scale, f"{kind} grad {name}: error {err:.2e} > {RTOL} x {model_scale:.2e}"
        worst_model = max(worst_model, err / model_scale)
        names.add(name)
    assert names == set(ref["grads"]), f"{kind}: parameters differ from the reference"
    return {"loss": loss_err, "grad/model": worst_model, "grad/tensor": worst_tensor}


def _cp2_checks(rank: int, world_size: int) -> dict:
    refs = _references(list(KINDS))
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    test_cp_memory.memory_checks()
    errors = {kind: _check_cp_model(kind, refs[kind], tp=1, cp=2) for kind in KINDS}
    with pytest.raises(ValueError, match=r"T=14 must be a multiple of 2\*context_parallel_size=4"):
        slice_batch_for_cp_rank({"tokens": torch.zeros(1, 14, dtype=torch.long)})
    return errors


def _cp2_tp2_checks(rank: int, world_size: int) -> str:
    parallel_state.initialize_model_parallel(context_parallel_size=4)
    test_cp_memory.memory_checks()
    parallel_state.destroy_model_parallel()
    kinds = ["v1", "v2", "gpt"]
    refs = _references(kinds)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    return {kind: _check_cp_model(kind, refs[kind], tp=2, cp=2) for kind in kinds}


def _report(results: list[dict]) -> None:
    for kind in results[0]:
        worst = {k: max(r[kind][k] for r in results) for k in results[0][kind]}
        print(f"{kind}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_cp2_equals_cp1_memories_and_models():
    _report(run_distributed(_cp2_checks, 2))  # every check asserts inside the ranks


def test_cp4_memories_and_cp2_tp2_models():
    _report(run_distributed(_cp2_tp2_checks, 4))
