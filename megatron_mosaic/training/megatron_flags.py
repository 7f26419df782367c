"""Megatron-LM training flags that have no separate feature here: accepted where the effect is
identical, refused by name (one line saying why) where it is not.

A Megatron-LM launch script can then swap ``pretrain_gpt.py`` for ``pretrain_mosaic.py`` and get
either the same run or one clear error, never ``unrecognized arguments``. The flags with a real
implementation are defined in ``argument_parser.py`` and checked in ``argument_checks.py``; the
full table is ``docs/megatron_lm_flags.md``. Stdlib only: parsed before torch is imported.
"""

from __future__ import annotations

import argparse
from typing import Callable

from megatron_mosaic.training.model_kinds import kind_of

ROTARY_BASE = 10000  # the baseline's RoPE (Megatron-LM's default)

NO_EXPERTS = "no model here has experts (MoE is not implemented for Memory Mosaics or the baseline)"

# Flags refused whenever they are given (store_true flags, or valued flags with default None).
REFUSED = {
    "--apply-layernorm-1p": "zero-centred (1 + gamma) norms are not implemented; the norms here "
                            "are plain LayerNorm (v1) / RMSNorm (v2, gpt)",
    "--decoupled-lr": "one learning rate schedule drives every parameter here; a separate "
                      "embedding/output-layer rate is not implemented",
    "--decoupled-min-lr": "one learning rate schedule drives every parameter here; a separate "
                          "embedding/output-layer rate is not implemented",
    "--fp16": "fp16 needs loss scaling, which is not implemented; use --bf16 (fp32 master weights)",
    "--fp8-amax-compute-algo": "the FP8 recipe is Transformer Engine's default here; its amax "
                               "settings are not configurable",
    "--fp8-amax-history-len": "the FP8 recipe is Transformer Engine's default here; its amax "
                              "settings are not configurable",
    "--fp8-param-gather": "FP8 parameters are not implemented (weights stay fp32)",
    "--grad-reduce-in-bf16": "gradients are accumulated and reduced in fp32 (main_grad) here",
    "--group-query-attention": "Mosaic memories have one key per head, and the baseline matches "
                               "them head for head: grouped-query attention is not implemented",
    "--tiktoken-pattern": "TikTokenizer is not supported (see --tokenizer-type)",
    "--num-experts": NO_EXPERTS,
    "--moe-aux-loss-coeff": NO_EXPERTS,
    "--moe-grouped-gemm": NO_EXPERTS,
    "--moe-router-load-balancing-type": NO_EXPERTS,
    "--moe-router-topk": NO_EXPERTS,
    "--moe-token-dispatcher-type": NO_EXPERTS,
}
_STORE_TRUE = {"--apply-layernorm-1p", "--fp16", "--fp8-param-gather", "--grad-reduce-in-bf16",
               "--group-query-attention", "--moe-grouped-gemm"}
_TYPES = {"--decoupled-lr": float, "--decoupled-min-lr": float, "--fp8-amax-history-len": int,
          "--moe-aux-loss-coeff": float, "--moe-router-topk": int, "--num-experts": int}

# Accepted and ignored because the effect here is exactly Megatron-LM's (reason in the help).
NO_OPS = {
    "--calculate-per-token-loss": "always on: the loss is the sum over tokens / the global token count",
    "--cross-entropy-loss-fusion": "a kernel choice; the loss is the same cross entropy",
    "--no-masked-softmax-fusion": "a kernel choice; retrieval and attention are torch SDPA here",
    "--no-create-attention-mask-in-dataloader": "the dataloader never builds attention masks here",
    "--no-position-embedding": "no learned position embedding exists here (Mosaic: none, gpt: RoPE)",
    "--use-mcore-models": "deprecated and ignored by Megatron-LM too: the models are Megatron-Core",
}


def add_megatron_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Megatron-LM flags without a separate feature here "
                             "(docs/megatron_lm_flags.md)")
    for flag, why in NO_OPS.items():
        g.add_argument(flag, action="store_true", help=f"accepted, no effect: {why}")
    for flag, why in REFUSED.items():
        if flag in _STORE_TRUE:
            g.add_argument(flag, action="store_true", help=f"refused: {why}")
        elif flag == "--moe-router-load-balancing-type":
            g.add_argument(flag, nargs="+", default=None, help=f"refused: {why}")
        else:
            g.add_argument(flag, type=_TYPES.get(flag, str), default=None, help=f"refused: {why}")
    # Accepted where the value describes the model this run builds, refused otherwise.
    g.add_argument("--attention-backend", default=None,
                   help="auto only: the baseline's attention is torch SDPA, Mosaic has no attention")
    g.add_argument("--expert-model-parallel-size", type=int, default=None, help="1 only: " + NO_EXPERTS)
    g.add_argument("--kv-channels", type=int, default=None, help="hidden size / heads only")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="as in Megatron-LM, used only with --group-query-attention (refused)")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="must be >= --seq-length; nothing here learns positions")
    g.add_argument("--normalization", default=None,
                   help="the model's own only: LayerNorm (mosaic-v1), RMSNorm (mosaic-v2, gpt)")
    g.add_argument("--position-embedding-type", default=None,
                   help="the model's own only: none (Mosaic: no positional encoding), rope (gpt)")
    g.add_argument("--rotary-base", type=int, default=None, help=f"gpt only, {ROTARY_BASE} only")
    g.add_argument("--rotary-percent", type=float, default=None, help="gpt only, 1.0 only")
    g.add_argument("--swiglu", action="store_true", help="mosaic-v2 and gpt (always SwiGLU)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="mosaic-v2 and gpt (always untied); mosaic-v1 is tied")


def _given(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def _model_checks(args: argparse.Namespace) -> list[tuple[bool, str]]:
    """(ok, message) for each flag whose acceptance depends on the model or other flags."""
    model, kind = args.model, kind_of(args)  # the model-specific facts checked below
    head_dim = args.hidden_size // max(args.num_attention_heads, 1)
    v = lambda flag: _given(args, flag)  # noqa: E731
    return [
        (v("--attention-backend") in (None, "auto"),
         f"--attention-backend {v('--attention-backend')}: only auto is accepted (the baseline's "
         f"attention is torch SDPA; Mosaic memories are not attention kernels)"),
        (v("--expert-model-parallel-size") in (None, 1),
         f"--expert-model-parallel-size {v('--expert-model-parallel-size')}: {NO_EXPERTS}"),
        (v("--kv-channels") in (None, head_dim),
         f"--kv-channels {v('--kv-channels')}: the head size here is --hidden-size / "
         f"--num-attention-heads ({head_dim})"),
        (v("--max-position-embeddings") is None or v("--max-position-embeddings") >= args.seq_length,
         f"--max-position-embeddings ({v('--max-position-embeddings')}) must be >= --seq-length "
         f"({args.seq_length})"),
        (v("--normalization") in (None, kind.normalization),
         f"--normalization {v('--normalization')}: --model {model} uses {kind.normalization}"),
        (v("--position-embedding-type") in (None, kind.position_embedding),
         f"--position-embedding-type {v('--position-embedding-type')}: --model {model} uses "
         f"{kind.position_embedding}" + (" (Memory Mosaics have no positional encoding)"
                                         if kind.is_mosaic else "")),
        (v("--rotary-base") in (None, ROTARY_BASE)
         and (v("--rotary-base") is None or kind.position_embedding == "rope"),
         f"--rotary-base {v('--rotary-base')}: only the gpt baseline has RoPE, with base {ROTARY_BASE}"),
        (v("--rotary-percent") in (None, 1.0)
         and (v("--rotary-percent") is None or kind.position_embedding == "rope"),
         f"--rotary-percent {v('--rotary-percent')}: only the gpt baseline has RoPE, on all "
         f"channels (1.0)"),
        (not args.swiglu or kind.swiglu,
         "--swiglu: mosaic-v1 has no MLP (its persistent memory replaces it)"),
        (not args.untie_embeddings_and_output_weights or not kind.tied_output,
         "--untie-embeddings-and-output-weights: mosaic-v1 ties its output layer to the embedding"),
    ]


def check_megatron_flags(args: argparse.Namespace, fail: Callable[[str], None]) -> None:
    """Call ``fail(message)`` for the first refused flag (its name and why)."""
    for flag, why in REFUSED.items():
        if _given(args, flag) not in (None, False):
            fail(f"{flag} is not supported: {why}")
    for ok, message in _model_checks(args):
        if not ok:
            fail(message)
