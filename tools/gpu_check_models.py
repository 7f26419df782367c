"""tools/gpu_check.py's second and third checks: v1, v2 and GPT forward and backward on the
device in fp32 and bf16, then v2 training steps that must not compile a new graph per step."""

from __future__ import annotations

import torch


def _train_step(model: torch.nn.Module, tokens: torch.Tensor, delay: int, bf16: bool) -> torch.Tensor:
    """Forward and backward of a next-token loss on ``tokens``, as a training step; the loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(tokens, labels=tokens.roll(-1, 1), long_term_delay=delay).float().mean()
    loss.backward()
    return loss


def check_models(device: torch.device) -> None:
    from megatron_mosaic.training.initialize import single_rank_megatron
    from tools.layer_benchmark import build, tokens_for

    with single_rank_megatron(seed=0):
        for kind in ("gpt", "v1", "v2"):
            model = build(kind, 64, 4, 16, 8).to(device)
            tokens = tokens_for(2, 128, packed=True).to(device)
            losses = {}
            for name, bf16 in (("fp32", False), ("bf16", True)):
                loss = _train_step(model, tokens, 8, bf16)
                grads = [p.grad for p in model.parameters() if p.requires_grad]
                if not torch.isfinite(loss) or any(g is None or not torch.isfinite(g).all() for g in grads):
                    raise AssertionError(f"{kind} {name}: non-finite loss or gradient")
                losses[name] = loss.item()
            if abs(losses["bf16"] - losses["fp32"]) > 0.02 * losses["fp32"]:
                raise AssertionError(f"{kind}: bf16 loss {losses['bf16']:.4f} vs fp32 {losses['fp32']:.4f}")
            print(f"    {kind}: packed documents, loss fp32 {losses['fp32']:.4f} bf16 {losses['bf16']:.4f}")


def check_no_recompiles(device: torch.device) -> None:
    """v2 training steps as the loop runs them (a new long-term delay each step, micro-batches
    with and without document starts, bf16) compile no new graph once each kind of step has run:
    on CUDA the scan and FlexAttention are compiled, and a graph per step would stall training
    for tens of seconds each time (tests/memory count the graphs of each piece on the CPU)."""
    from torch._dynamo.utils import counters

    from megatron_mosaic.training.initialize import single_rank_megatron
    from tools.layer_benchmark import build, tokens_for

    with single_rank_megatron(seed=0):
        model = build("v2", 64, 4, 16, 8).to(device)
        batches = {"packed": tokens_for(2, 128, packed=True).to(device),
                   "single": tokens_for(2, 128, packed=False).to(device)}

        for docs, delay in (("packed", 4), ("single", 6)):  # warm-up: every kind of step once
            _train_step(model, batches[docs], delay, bf16=True)
        warm = counters["stats"]["unique_graphs"]
        for docs, delay in (("packed", 8), ("single", 10), ("packed", 12), ("packed", 14)):
            _train_step(model, batches[docs], delay, bf16=True)
        new = counters["stats"]["unique_graphs"] - warm
    print(f"    v2: {warm} compiled graphs after warm-up, {new} more over 4 steps with new delays")
    if new:
        raise AssertionError(f"{new} graph(s) compiled after warm-up: a compile per step")
