"""Per-layer cost of Mosaic v1, v2 and the GPT baseline on any device, as FLOP efficiency.

Used by tools/gpu_check.py (T = 4k, 16k, 32k on a GPU) and tools/bench_layers.py (CPU table).
Analytic FLOPs count as Megatron-LM does: a multiply-add is 2 FLOPs, training is 3 forward
passes; per token the forward costs 2 x the layer's matrix weights (v1's persistent slots
included: they are scored and mixed like a weight matrix) plus 4 d per (query, key) pair the
layer retrieves from under its visibility rule on one document of T tokens. Scans, norms and
softmax are O(T d) and left out. Times are medians of interleaved forward + backward passes of
the models' decoders (``layer_step``: the layers alone, as the FLOPs; no embedding, output
layer or loss) in one process; "aten ops" counts the ops one such pass dispatches (the
launch-bound cost on a GPU).
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_mosaic.model import MosaicConfig, MosaicModel, build_gpt_baseline, gpt_baseline_config

VOCAB, EOD = 256, 3
# Dense bf16 peak FLOP/s by device name (vendor datasheets, no sparsity), for MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
GPU_SHAPE = dict(d=2048, heads=16, window=256, delay=64)  # the paper's small model, one layer
CPU_SHAPE = dict(d=64, heads=4, window=32, delay=16)


def build(kind: str, d: int, heads: int, window: int, delay: int, package=None, layers: int = 1) -> torch.nn.Module:
    """A one-layer (``layers``) model of ``kind`` (gpt, v1, v2), seeded, on the CPU; ``package``:
    another copy of megatron_mosaic to build it with (tools/bench_memory_revision.py)."""
    common = dict(num_layers=layers, hidden_size=d, num_attention_heads=heads, use_cpu_initialization=True)
    model = sys.modules[__name__] if package is None else importlib.import_module(f"{package.__name__}.model")
    torch.manual_seed(0)
    if kind == "gpt":
        return model.build_gpt_baseline(model.gpt_baseline_config(ffn_hidden_size=3 * d, **common), VOCAB,
                                        eod_token_id=EOD)
    if kind == "v1":
        config = model.MosaicConfig(mosaic_version=1, persistent_memory_size=int(3.5 * d), **common)
    else:
        config = model.MosaicConfig(mosaic_version=2, ffn_hidden_size=3 * d, short_term_window=window,
                                    long_term_delay_range=(delay, delay), **common)
    return model.MosaicModel(config, VOCAB, eod_token_id=EOD)


def compile_memory_features(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each key/value extractor's ``features`` (scan, key norm, value peek and
    norm: the memory's elementwise regions) run through torch.compile (inductor; on the CPU it
    needs a C compiler), shapes static. Projections, retrieval, norms and the FFN stay eager, as
    in the GPT baseline, so the comparison is the memory regions compiled against no change.
    A no-op for the GPT baseline (it has no extractors)."""
    from megatron_mosaic.model.extractors import GatedKeyExtractor, LeakyKeyExtractor, ValueExtractor

    for module in model.modules():
        if isinstance(module, (GatedKeyExtractor, LeakyKeyExtractor, ValueExtractor)):
            module.features = torch.compile(module.features, dynamic=False)
    return model


def tokens_for(B: int, T: int, packed: bool) -> torch.Tensor:
    """Random tokens; ``packed``: EOD-separated documents of 37..300 tokens."""
    tokens = torch.randint(EOD + 1, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    if packed:
        g = torch.Generator().manual_seed(1)
        for b in range(B):
            t = int(torch.randint(37, 300, (1,), generator=g))
            while t < T:
                tokens[b, t] = EOD
                t += int(torch.randint(37, 300, (1,), generator=g))
    return tokens


def visible_pairs(kind: str, T: int, window: int, delay: int) -> float:
    """Mean (query, key) pairs per token per layer over one T-token document."""
    if kind == "gpt":
        return (T + 1) / 2
    if kind == "v1":
        return (T - 1) / 2
    short = sum(min(t, window - 1) for t in range(T)) / T
    long = sum(max(t - delay + 1, 0) for t in range(T)) / T
    return short + long


def layer_flops(model: torch.nn.Module, kind: str, T: int, window: int, delay: int) -> float:
    """Training FLOPs of the model's decoder layers for one T-token sequence (the fused memory
    projections' zero pad rows are computed but not counted: they do no useful work)."""
    from megatron_mosaic.model.fused_projection import logical_tensors

    params = logical_tensors(model, dict(model.named_parameters()))
    weights = sum(p.numel() for n, p in params.items() if ".layers." in n and p.dim() >= 2)
    d = model.config.hidden_size
    per_token = 2.0 * weights + 4.0 * d * model.config.num_layers * visible_pairs(kind, T, window, delay)
    return 3.0 * per_token * T


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_step(model: torch.nn.Module, tokens: torch.Tensor, delay: int, bf16: bool) -> Callable[[], None]:
    """A callable running forward + backward of ``model``'s decoder (its layers and final norm)
    on the inputs the model hands it for ``tokens``: what ``layer_flops`` counts. The embedding,
    output layer and loss are left out: the same for every kind, they would pull every ratio
    towards 1. The micro-batch's shared masks are dropped before each call, so the layer pays
    for building them, as the first layer of every micro-batch does."""
    captured: dict = {}
    handle = model.decoder.register_forward_pre_hook(lambda _, args, kwargs: captured.update(kwargs, args=args),
                                                     with_kwargs=True)
    try:
        with torch.no_grad(), torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
            model(tokens, long_term_delay=delay)
    finally:
        handle.remove()
    if captured.pop("args"):
        raise RuntimeError("layer_step: the model passed its decoder positional arguments")
    hidden = captured.pop("hidden_states").detach().requires_grad_()
    layout = getattr(captured.get("packed_seq_params"), "layout", None)
    upstream: list[torch.Tensor] = []

    def run() -> None:
        model.zero_grad(set_to_none=True)
        hidden.grad = None
        if layout is not None:
            layout.cache.clear()
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.decoder(hidden_states=hidden, **captured)
        if not upstream:  # one fixed gradient from the loss side, seeded
            gen = torch.Generator(device=out.device).manual_seed(0)
            upstream.append(torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype))
        out.backward(upstream[0])
    return run


def time_steps(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int,
               percentile: float | None = None) -> dict[str, float]:
    """Median seconds of each step (``percentile``: that percentile instead), interleaved so load
    changes hit all alike."""
    for run in steps.values():  # warm-up (kernel selection, allocator, shape-constant masks)
        run()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, run in steps.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[k].append(time.perf_counter() - start)
    if percentile is None:
        return {k: statistics.median(v) for k, v in times.items()}
    return {k: sorted(v)[min(len(v) - 1, int(len(v) * percentile / 100))] for k, v in times.items()}


def time_models(models: dict[str, torch.nn.Module], tokens: torch.Tensor, delay: int, repeats: int,
                bf16: bool = False) -> dict[str, float]:
    """Median seconds of each model's decoder fwd+bwd (``layer_step``), interleaved."""
    return time_steps({k: layer_step(m, tokens, delay, bf16) for k, m in models.items()}, tokens.device, repeats)


def peak_memory(model: torch.nn.Module, tokens: torch.Tensor, delay: int, bf16: bool) -> float | None:
    """Peak device memory (GiB) of one decoder fwd+bwd; None off CUDA."""
    if tokens.device.type != "cuda":
        return None
    run = layer_step(model, tokens, delay, bf16)
    torch.cuda.reset_peak_memory_stats(tokens.device)
    run()
    return torch.cuda.max_memory_allocated(tokens.device) / 2**30


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops(model: torch.nn.Module, tokens: torch.Tensor, delay: int, bf16: bool) -> int:
    """aten ops dispatched by one decoder fwd+bwd (``layer_step``; each one a kernel launch or
    more on a GPU), after a warm-up call."""
    run = layer_step(model, tokens, delay, bf16)
    run()
    counter = _OpCounter()
    with counter:
        run()
    return counter.count


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def print_device_table(device: torch.device, lengths: list[int], repeats: int,
                       out_of_time: Callable[[], bool] = lambda: False) -> None:
    """tokens/s, peak memory, MFU and time/FLOP ratios to GPT, per length and document layout;
    the rows left when ``out_of_time()`` turns true are listed as skipped, not run."""
    shape = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    bf16 = device.type == "cuda"
    peak = peak_flops(device)
    models = {k: build(k, shape["d"], shape["heads"], shape["window"], shape["delay"]).to(device)
              for k in ("gpt", "v1", "v2")}
    print(f"    one layer, d={shape['d']} H={shape['heads']} window={shape['window']} delay={shape['delay']}, "
          f"B=1, {'bf16' if bf16 else 'fp32'}; ratios are to GPT (time ratio / FLOP ratio: 1 = same FLOP efficiency)")
    print(f"    {'T':>6} {'docs':<7} {'model':<5} {'tokens/s':>11} {'peak GiB':>9} {'MFU':>6} "
          f"{'time/gpt':>9} {'flop/gpt':>9} {'ratio':>6} {'aten ops':>9}")
    for T in lengths:
        for packed in (False, True):
            if out_of_time():
                print(f"    {T:>6} {'packed' if packed else 'single':<7} SKIP (time budget spent)", flush=True)
                continue
            tokens = tokens_for(1, T, packed).to(device)
            seconds = time_models(models, tokens, shape["delay"], repeats, bf16)
            flops = {k: layer_flops(m, k, T, shape["window"], shape["delay"]) for k, m in models.items()}
            for k, m in models.items():
                mem = peak_memory(m, tokens, shape["delay"], bf16)
                mfu = f"{flops[k] / seconds[k] / peak:6.1%}" if peak else f"{'n/a':>6}"
                t_ratio, f_ratio = seconds[k] / seconds["gpt"], flops[k] / flops["gpt"]
                print(f"    {T:>6} {'packed' if packed else 'single':<7} {k:<5} {T / seconds[k]:>11,.0f} "
                      f"{(f'{mem:.2f}' if mem is not None else 'n/a'):>9} {mfu} {t_ratio:>9.2f} {f_ratio:>9.2f} "
                      f"{t_ratio / f_ratio:>6.2f} {aten_ops(m, tokens, shape['delay'], bf16):>9,}", flush=True)
