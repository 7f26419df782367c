"""One training step and one evaluation pass (the outer loop is in pretrain.py).

Every step goes through Megatron-Core's ``get_forward_backward_func()``: the no-pipelining
schedule at PP=1, 1F1B at PP>1, interleaved 1F1B with virtual stages. Micro-batch losses are
summed per token and the gradient is divided by the global token count in
``finalize_model_grads`` (``calculate_per_token_loss``), so DP, gradient accumulation and
pipelining all compute the gradient of the same global-batch mean loss.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mosaic.training.arguments import num_microbatches
from megatron_mosaic.training.batch_schedule import batch_for_step
from megatron_mosaic.training.initialize import device
from megatron_mosaic.training.model_kinds import kind_of

Batch = dict[str, torch.Tensor]
DataIterators = list[Iterator[Batch]]


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm stopped being finite; nothing was saved."""


@dataclass
class TrainState:
    iteration: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # samples of the training set used so far (all DP ranks)


@dataclass
class StepResult:
    loss: float  # mean per-token loss of the global batch
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used
    samples: int = 0  # the global batch size of this step


def long_term_delay_for_step(args: argparse.Namespace, iteration: int) -> Optional[int]:
    """v2's training delay m for the step after ``iteration`` completed steps (same on all ranks)."""
    if not kind_of(args).long_term_delay:
        return None
    from megatron_mosaic.model.delay import sample_long_term_delay

    low, high = args.long_term_delay_range
    return sample_long_term_delay(int(args.seed), int(iteration), int(low), int(high))


def autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """bf16 autocast on whichever device computes (fp32 master weights, no loss scaling)."""
    if not args.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device().type, dtype=torch.bfloat16)


def _loss_func(loss_mask: torch.Tensor, positions: Optional[torch.Tensor], seq_length: int,
               output: torch.Tensor):
    """Sum of masked per-token losses; the schedule adds up token counts for the 1/N scaling.

    With ``positions`` (B, T_local) global token positions, also reports per-position loss sums
    and counts (2, seq_length); under context parallelism a rank holds two separated chunks.
    """
    losses = output.float()
    mask = loss_mask.to(losses.dtype)
    loss_sum = (losses * mask).sum()
    count = mask.sum()
    report = {"lm loss": torch.stack([loss_sum.detach(), count])}
    if positions is not None:
        per_position = torch.zeros(2, seq_length, dtype=losses.dtype, device=losses.device)
        index = positions.reshape(-1).long()
        per_position[0].index_add_(0, index, (losses.detach() * mask).reshape(-1))
        per_position[1].index_add_(0, index, mask.reshape(-1))
        report["per position"] = per_position
    return loss_sum, count.to(torch.int), report


def _micro_batch_context(args: argparse.Namespace, tokens: torch.Tensor, layout: Any,
                         long_term_delay: Optional[int]):
    """The MemoryContext every layer of this micro-batch reads (layout, delay, fast-path flags,
    CP group), built once here instead of in each layer; the GPT baseline ignores the delay."""
    from megatron_mosaic.model.context import micro_batch_context

    if long_term_delay is None:  # evaluation: v2's inference delay
        long_term_delay = getattr(args, "long_term_inference_delay", 1)
    eod = getattr(args, "eod_token_id", None) if args.document_masking else None
    cp_group = parallel_state.get_context_parallel_group() if args.context_parallel_size > 1 else None
    return micro_batch_context(tokens, long_term_delay, layout=layout, eod_token_id=eod, cp_group=cp_group)


def make_forward_step(args: argparse.Namespace, long_term_delay: Optional[int],
                      per_position: bool = False) -> Callable:
    """The ``forward_step_func`` of Megatron's schedules for one step."""
    dev = device()
    pipeline_dtype = torch.bfloat16 if args.bf16 else torch.float32

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
        try:
            batch = next(data_iterator)
        except StopIteration:
            raise RuntimeError("the data iterator ran out of micro-batches: the dataset was built "
                               "for fewer samples than --train-iters x --global-batch-size") from None
        layout = None
        if args.context_parallel_size > 1:
            # This rank's two load-balanced chunks; the layout keeps global positions and
            # document starts, built from the full sequence before the split.
            from megatron_mosaic.parallel.context_parallel import slice_batch_for_cp_rank

            batch = slice_batch_for_cp_rank(batch, getattr(args, "eod_token_id", None),
                                            args.document_masking)
            layout = batch["layout"]
        tokens = batch["tokens"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
        positions = None
        if per_position:  # position of each token in its (full, unsplit) sequence
            positions = (layout.positions if layout is not None
                         else torch.arange(tokens.shape[1]).expand_as(tokens)).to(dev)
        context = _micro_batch_context(args, tokens, layout, long_term_delay)
        with autocast(args):
            output = model(tokens, labels=labels, packed_seq_params=context)
        if output.dim() == 3:  # hidden states for the next pipeline stage, [T, B, d]
            # Under autocast a stage may end in bf16 or fp32 depending on its last op; the
            # receiving stage allocates config.pipeline_dtype, so send exactly that.
            output = output.to(pipeline_dtype)
        return output, partial(_loss_func, loss_mask, positions, args.seq_length)

    return forward_step


def _run_schedule(args: argparse.Namespace, model: Sequence[torch.nn.Module],
                  data_iterators: DataIterators, forward_step: Callable, forward_only: bool,
                  microbatches: Optional[int] = None) -> list:
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
        model=list(model) if len(model) > 1 else model[0],
        num_microbatches=microbatches or num_microbatches(args),
        # The full length: megatron-core 0.16.1's get_tensor_shapes divides by the CP size itself.
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )


def _reduce_reports(store: list[dict[str, torch.Tensor]], key: str, shape: Sequence[int]) -> torch.Tensor:
    """Sum a report over micro-batches, DP x CP ranks and (from the last stage) PP ranks."""
    total = torch.zeros(shape, dtype=torch.float64, device=device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for report in store:
            total += report[key].double()
    if dist.is_initialized():
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total


@contextlib.contextmanager
def _timed(timer: Callable, name: str):
    """Megatron timers (``--timing-log-level``) have start/stop; a null timer does nothing."""
    t = timer(name)
    if not hasattr(t, "start"):
        yield
        return
    t.start()
    try:
        yield
    finally:
        t.stop()


def train_step(args: argparse.Namespace, model: Sequence[torch.nn.Module], optimizer: Any,
               scheduler: Any, data_iterators: DataIterators, state: TrainState,
               timer: Optional[Callable] = None) -> StepResult:
    """One optimizer step over a global batch.

    Raises TrainingDivergedError, before touching the weights, if either is not finite.
    """
    optimizer.zero_grad()
    # Constant, or growing under --rampup-batch-size (megatron-core's microbatch calculator).
    microbatches, batch_size = batch_for_step(state.consumed_samples)
    forward_step = make_forward_step(args, long_term_delay_for_step(args, state.iteration))
    # Megatron's schedules time "forward-backward" themselves (config.timers).
    store = _run_schedule(args, model, data_iterators, forward_step, forward_only=False,
                          microbatches=microbatches)
    timer = timer or (lambda name: contextlib.nullcontext())
    loss_sum, tokens = _reduce_reports(store, "lm loss", (2,)).tolist()
    loss = loss_sum / max(tokens, 1.0)
    step = state.iteration + 1
    if not math.isfinite(loss):
        raise TrainingDivergedError(f"iteration {step}: training loss is {loss}; stopping without "
                                    f"saving (the last checkpoint is untouched)")
    lr = optimizer.param_groups[0]["lr"]
    with _timed(timer, "optimizer"):
        grad_norm = optimizer.step()
    if not math.isfinite(grad_norm):
        raise TrainingDivergedError(f"iteration {step}: gradient norm is {grad_norm} (loss "
                                    f"{loss:.4f}); stopping without saving (the last checkpoint "
                                    f"is untouched)")
    scheduler.step(batch_size)  # the scheduler counts samples, as Megatron-LM's
    state.iteration = step
    state.consumed_samples += batch_size
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, samples=batch_size)


@torch.no_grad()
def evaluate(args: argparse.Namespace, model: Sequence[torch.nn.Module],
             data_iterators: DataIterators, num_batches: int,
             per_position: bool = False) -> tuple[float, Optional[torch.Tensor]]:
    """Mean validation loss over ``num_batches`` global batches (the inference delay for v2).

    With ``per_position`` also returns a (2, T) tensor: loss sums and token counts per position.
    """
    for chunk in model:
        chunk.eval()
    forward_step = make_forward_step(args, None, per_position)
    totals = torch.zeros(2, dtype=torch.float64, device=device())
    positions = torch.zeros(2, args.seq_length, dtype=torch.float64, device=device())
    try:
        for _ in range(num_batches):
            store = _run_schedule(args, model, data_iterators, forward_step, forward_only=True)
            totals += _reduce_reports(store, "lm loss", (2,))
            if per_position:
                positions += _reduce_reports(store, "per position", (2, args.seq_length))
    finally:
        for chunk in model:
            chunk.train()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return loss, (positions.cpu() if per_position else None)
