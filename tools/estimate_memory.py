"""Per-rank memory of a training layout, before a GPU hour is spent.

    python tools/estimate_memory.py --model mosaic-v2 --num-layers 32 --hidden-size 4096 \\
        --num-attention-heads 32 --ffn-hidden-size 14336 --vocab-size 128256 --seq-length 32768 \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --data-parallel-size 4 \\
        --sequence-parallel --recompute-granularity full --use-distributed-optimizer --bf16 \\
        --gpu-memory-gib 80

Prints the bytes of the worst pipeline stage (first or last) for weights, gradients, optimizer
state and activations, and the largest micro-batch that fits ``--gpu-memory-gib`` minus
``--reserve-gib`` (CUDA context, communication buffers, fragmentation).

Weights, gradients and optimizer state are counted from the model's parameter shapes (each
stage's own layers, embedding on the first, output layer and final norm on the last):
fp32 weights (4 B) or bf16 (2 B, also with fp8 compute); fp32 gradient buffers (4 B, Megatron
DDP's main_grad); Adam moments (8 B) plus fp32 master weights with bf16 (4 B), divided over
DP x CP with --use-distributed-optimizer.

Activations are the bytes autograd keeps between forward and backward, in fp32 floats per token
per layer, measured on this repository's implementation (``SavedTensorMeter``, CPU, long-
sequence code paths: banded short-term windows, shifted-causal long-term memory, whole
documents) and fitted to the model shape: ``COEFFICIENTS`` below, refitted by
``tools/fit_activation_memory.py`` whenever the layers change. bf16 scales them by the
measured bf16 / fp32 ratio of each model (Mosaic memories keep fp32 scans). 1F1B keeps
min(PP, micro-batches) micro-batches in flight on the first stage, interleaving
x (1 + (PP - 1) / (PP x VP)) (Megatron's accounting). The test checks the estimate against
real CPU runs (tests/training/test_estimate_memory.py).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

GIB = 2**30

# Floats saved per token per layer (fp32): replicated over TP (R, sharded by SP), TP-sharded (S),
# the sequence gather under SP (G), per-head retrieval term (H x (a + b x max(window, 64))), and
# the part --recompute-granularity selective recomputes. d = hidden, f = ffn hidden.
COEFFICIENTS = {
    "mosaic-v2": dict(R=7.0, S_d=26.16, S_f=5.0, S_c=332.3, head=(15.7, 0.296), G=1.0, core_d=24.66,
                      core_heads=True, bf16=0.85),
    "mosaic-v1": dict(R=4.0, S_d=17.18, S_f=0.0, S_c=6.0, head=(56.3, 0.0), G=1.0, core_d=12.2,
                      core_heads=True, bf16=0.96),
    "gpt": dict(R=7.0, S_d=6.0, S_f=5.0, S_c=0.0, head=(0.0, 0.0), G=0.5, core_d=0.0,
                core_heads=False, bf16=0.57),
}


@dataclass
class Model:
    kind: str
    num_layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    window: int = 256
    persistent_memory_size: int = 0  # v1; 0 = round(3.5 d)


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    vp: int = 1
    cp: int = 1
    dp: int = 1
    micro_batch: int = 1
    seq_length: int = 4096
    num_microbatches: int = 8
    recompute: str = "none"  # none | selective | full
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp8


def _fused(width: float) -> float:
    """A memory's fused projection width on one TP rank, padded for FP8 GEMMs
    (model/fused_projection.py): the pad rows are allocated, trained (at zero) and stored."""
    return -(-width // 16) * 16


def layer_parameters(m: Model, tp: int) -> float:
    """Parameters of one layer on one TP rank (TP-split matrices and per-head scalars)."""
    d, h, f = m.hidden, m.heads, m.ffn
    if m.kind == "mosaic-v2":
        # Both memories' [W_k; W_g; W_lambda; W_v] in one fused GEMM, 5 per-head scalars each.
        memories = _fused(2 * (2 * d + 2 * h) / tp) * d + 2 * 5 * h / tp
        return memories + (2 * d * d + 3 * d * f) / tp + 2 * d
    if m.kind == "mosaic-v1":
        p = m.persistent_memory_size or round(3.5 * d)
        # Fused [W_k; W_v] of the contextual memory and W_k of the persistent one, with biases.
        fused = (_fused(2 * d / tp) + _fused(d / tp)) * (d + 1)
        replicated = 2 * d + 2 * 2 * d  # 2 row biases, 2 LayerNorms (weight + bias)
        return fused + (2 * d * d + 2 * p * d + 7 * h) / tp + replicated
    return (4 * d * d + 3 * d * f) / tp + 2 * d


def stage_parameters(m: Model, lay: Layout, first: bool, last: bool) -> float:
    n = layer_parameters(m, lay.tp) * m.num_layers / lay.pp
    if first:
        n += m.vocab * m.hidden / lay.tp
    if last:
        n += m.hidden * (2 if m.kind == "mosaic-v1" else 1)  # final norm
        if not (first and m.kind == "mosaic-v1"):  # v1 ties the output layer (a copy at PP > 1)
            n += m.vocab * m.hidden / lay.tp
    return n


def layer_floats(m: Model, lay: Layout, selective: bool) -> float:
    """fp32 floats saved per token by one layer without full recompute."""
    c, d = COEFFICIENTS[m.kind], m.hidden
    a, b = c["head"]
    heads = m.heads * (a + b * max(m.window, 64))
    sharded = c["S_d"] * d + c["S_f"] * m.ffn + c["S_c"] + heads
    if selective:
        sharded -= c["core_d"] * d + (heads if c["core_heads"] else 0.0)
    replicated = c["R"] * d
    if lay.sequence_parallel:
        return replicated / lay.tp + sharded / lay.tp + c["G"] * d
    return replicated + sharded / lay.tp


def activation_bytes(m: Model, lay: Layout, first: bool, last: bool) -> float:
    tokens = lay.micro_batch * lay.seq_length / lay.cp
    float_bytes = 4.0 * (COEFFICIENTS[m.kind]["bf16"] if lay.precision != "fp32" else 1.0)
    layers = m.num_layers / lay.pp
    full = layer_floats(m, lay, selective=lay.recompute == "selective")
    if lay.recompute == "full":
        inputs = m.hidden / (lay.tp if lay.sequence_parallel else 1)  # a checkpointed layer keeps its input
        n = min(lay.recompute_num_layers, layers)
        if lay.recompute_method == "uniform":  # unit inputs + one unit recomputed in backward
            per_mb, live = (layers / n) * inputs, n * full
        else:  # block: the first n layers checkpointed, the rest keep everything
            per_mb, live = n * inputs + (layers - n) * full, full
    else:
        per_mb, live = layers * full, 0.0
    in_flight = min(lay.pp, lay.num_microbatches) if first else 1
    if lay.vp > 1 and first:
        in_flight *= 1 + (lay.pp - 1) / (lay.pp * lay.vp)
    ends = (m.hidden / (lay.tp if lay.sequence_parallel else 1)) if first else 0.0
    if last:  # final norm in/out and the fp32 logits of the vocabulary-parallel loss
        ends += 2 * m.hidden / (lay.tp if lay.sequence_parallel else 1) + m.vocab / lay.tp + 5
    return tokens * float_bytes * (per_mb * in_flight + live + ends * in_flight)


def estimate(m: Model, lay: Layout) -> dict:
    """Bytes per rank of the worst stage: weights, grads, optimizer, activations, total."""
    best = None
    for first, last in {(True, lay.pp == 1), (lay.pp == 1, True)}:
        params = stage_parameters(m, lay, first, last)
        half = lay.precision in ("bf16", "fp8")
        out = dict(parameters=params, weights=params * (2 if half else 4), grads=params * 4,
                   optimizer=params * (12 if half else 8) / (lay.dp * lay.cp if lay.distributed_optimizer else 1),
                   activations=activation_bytes(m, lay, first, last))
        out["total"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
        out["stage"] = "first" if first else "last"
        if best is None or out["total"] > best["total"]:
            best = out
    return best


def largest_micro_batch(m: Model, lay: Layout, gpu_bytes: float) -> int:
    """The largest micro-batch whose estimate fits ``gpu_bytes`` (0: not even 1)."""
    fit = 0
    for mb in (1, 2, 4, 8, 16, 32, 64):
        trial = Layout(**{**lay.__dict__, "micro_batch": mb})
        if estimate(m, trial)["total"] > gpu_bytes:
            break
        fit = mb
    return fit


PAPER_MODELS = {  # Memory Mosaics at scale: v2 "small" (1.5B) and "large" (8B), Llama-3 vocabulary
    "small": Model("mosaic-v2", 24, 2048, 16, 6144, 128256),
    "large": Model("mosaic-v2", 32, 4096, 32, 14336, 128256),
}
# Layouts for the README table: bf16, distributed optimizer over DP x CP, 32 micro-batches per step.
PAPER_LAYOUTS = [
    ("small", dict(seq_length=4096, dp=8)),
    ("small", dict(seq_length=4096, dp=8, recompute="selective")),
    ("small", dict(seq_length=32768, tp=2, sequence_parallel=True, dp=4, recompute="full")),
    ("small", dict(seq_length=32768, tp=2, sequence_parallel=True, cp=2, dp=2, recompute="selective")),
    ("large", dict(seq_length=4096, tp=4, sequence_parallel=True, dp=2, recompute="selective")),
    ("large", dict(seq_length=4096, tp=4, sequence_parallel=True, pp=2, dp=4, recompute="full")),
    ("large", dict(seq_length=32768, tp=8, sequence_parallel=True, pp=4, dp=2, recompute="full")),
    ("large", dict(seq_length=32768, tp=8, sequence_parallel=True, cp=4, dp=2, recompute="full")),
]


def paper_table(reserve_gib: float) -> str:
    """Markdown table: the paper's models at 4k and 32k on 80 and 141 GB GPUs."""
    rows = ["| model | seq | layout (bf16, distributed optimizer) | weights+grads+optimizer GiB | "
            "activations GiB (micro-batch 1) | largest micro-batch 80 GB | 141 GB |", "|---|---|---|---|---|---|---|"]
    for name, change in PAPER_LAYOUTS:
        lay = Layout(**{**Layout(precision="bf16", distributed_optimizer=True, num_microbatches=32).__dict__, **change})
        est = estimate(PAPER_MODELS[name], lay)
        fits = [largest_micro_batch(PAPER_MODELS[name], lay, (gb * 1e9 / GIB - reserve_gib) * GIB) or "does not fit"
                for gb in (80, 141)]
        parts = [f"TP{lay.tp}" + (" SP" if lay.sequence_parallel else ""), f"PP{lay.pp}", f"CP{lay.cp}", f"DP{lay.dp}",
                 f"recompute {lay.recompute}"]
        states = est["weights"] + est["grads"] + est["optimizer"]
        rows.append(f"| {name} | {lay.seq_length // 1024}k | {', '.join(parts)} | {states / GIB:.1f} | "
                    f"{est['activations'] / GIB:.1f} | {fits[0]} | {fits[1]} |")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--model", choices=tuple(COEFFICIENTS), default="mosaic-v2")
    add("--paper-table", action="store_true", help="print the README table for the paper's models and exit")
    add("--num-layers", type=int)
    add("--hidden-size", type=int)
    add("--num-attention-heads", type=int)
    add("--ffn-hidden-size", type=int, default=None, help="default 3 x hidden")
    add("--vocab-size", type=int, default=50304, help="padded vocabulary")
    add("--short-term-window", type=int, default=256)
    add("--persistent-memory-size", type=int, default=0)
    for flag, default in (("--tensor-model-parallel-size", 1), ("--pipeline-model-parallel-size", 1),
                          ("--virtual-pipeline-model-parallel-size", 1), ("--context-parallel-size", 1),
                          ("--data-parallel-size", 1), ("--micro-batch-size", 1), ("--seq-length", 4096),
                          ("--num-microbatches", 8), ("--recompute-num-layers", 1)):
        add(flag, type=int, default=default)
    add("--recompute-granularity", choices=("none", "selective", "full"), default="none")
    add("--recompute-method", choices=("uniform", "block"), default="uniform")
    add("--sequence-parallel", action="store_true")
    add("--use-distributed-optimizer", action="store_true")
    add("--bf16", action="store_true")
    add("--fp8-format", default=None, help="fp8 compute: bf16 weights and activations here")
    add("--gpu-memory-gib", type=float, default=80.0)
    add("--reserve-gib", type=float, default=4.0, help="CUDA context, NCCL buffers, fragmentation")
    return p


def from_args(a: argparse.Namespace) -> tuple[Model, Layout]:
    model = Model(a.model, a.num_layers, a.hidden_size, a.num_attention_heads, a.ffn_hidden_size or 3 * a.hidden_size,
                  a.vocab_size, a.short_term_window, a.persistent_memory_size)
    precision = "fp8" if a.fp8_format else ("bf16" if a.bf16 else "fp32")
    layout = Layout(a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                    a.virtual_pipeline_model_parallel_size, a.context_parallel_size, a.data_parallel_size,
                    a.micro_batch_size, a.seq_length, a.num_microbatches, a.recompute_granularity,
                    a.recompute_method, a.recompute_num_layers, a.sequence_parallel,
                    a.use_distributed_optimizer, precision)
    return model, layout


def main(argv=None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    if a.paper_table:
        print(paper_table(a.reserve_gib))
        return 0
    if not (a.num_layers and a.hidden_size and a.num_attention_heads):
        parser.error("--num-layers, --hidden-size and --num-attention-heads are required")
    model, layout = from_args(a)
    est = estimate(model, layout)
    budget = (a.gpu_memory_gib - a.reserve_gib) * GIB
    print(f"{model.kind}: {est['parameters'] / 1e9:.2f} B parameters on the worst rank ({est['stage']} stage)")
    for key in ("weights", "grads", "optimizer", "activations", "total"):
        print(f"  {key:<12} {est[key] / GIB:10.2f} GiB")
    fits = largest_micro_batch(model, layout, budget)
    print(f"  fits {a.gpu_memory_gib:g} GiB (minus {a.reserve_gib:g} reserved): "
          + (f"largest micro-batch {fits}" if fits else "no (not even micro-batch 1)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
