"""Megatron-LM-style checkpoints on Megatron-Core distributed checkpointing (torch_dist).

Layout::

    DIR/latest_checkpointed_iteration.txt   iteration number, written last and atomically
    DIR/iter_0000100/                       a dist_checkpointing directory

Common state: ``args`` (every run argument), ``iteration``, ``consumed_samples``, ``opt_param_scheduler``
and the optimizer's hyper-parameters. Sharded state: ``model`` (``model.sharded_state_dict()``,
or ``model0``, ``model1``... for virtual pipeline chunks), ``optimizer`` (Megatron's optimizer:
Adam moments, and with the distributed optimizer master weights, shaped like their parameters;
``optimizer_format`` names the optimizer; a load checks that this run's optimizer can read it,
the distributed and the plain one read each other's) and ``rng_state``
(python, numpy, torch and CUDA states of every rank).
Tensors are stored by global key and offset, so a checkpoint loads under another DP, TP or PP
layout (RNG states are restored only when TP, PP and DP x CP match).

A save goes to ``iter_N.partial`` and is renamed to ``iter_N`` when every rank has finished;
only then is the tracker file replaced. A crash at any point leaves the previous checkpoint
as the one ``load_checkpoint`` finds.

What a checkpoint is made of (tracker, model and RNG state, the checks a load makes) is in
``checkpoint_state``; this module holds the save and load flow and re-exports those names.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_mosaic.training.checkpoint_safety import (
    CheckpointSaveError,
    NonFiniteCheckpointError,
    agree_on_failed_save,
    checkpoint_size,
    first_non_finite,
    format_bytes,
    free_bytes,
    save_failed_message,
)
from megatron_mosaic.training.checkpoint_state import (  # noqa: F401  (re-exported: importers and tests name them here)
    ARCHITECTURE_ARGS,
    CHECKPOINT_VERSION,
    TRACKER_FILENAME,
    CheckpointMismatchError,
    _check_optimizer_format,
    _model_part,
    _model_sharded_state_dict,
    _resolve,
    _rng_sharded_object,
    _scheduler_state,
    _set_local_rng_state,
    _unwrap,
    _write_tracker,
    check_checkpoint_matches,
    checkpoint_dir,
    read_checkpoint_args,
    read_tracker,
)

logger = logging.getLogger(__name__)


def _finish_param_gather(model_chunks: Sequence[torch.nn.Module]) -> None:
    """--overlap-param-gather leaves the all-gather of the last step's parameters to the next
    forward: finish it here, or other ranks' shards of the weights would be saved stale."""
    for chunk in model_chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


# ---- save -------------------------------------------------------------------------------------
def save_checkpoint(save_dir: str, iteration: int, model_chunks: Sequence[torch.nn.Module],
                    optimizer: Any = None, scheduler: Any = None, *, args: dict[str, Any],
                    consumed_samples: int = 0, save_rng: bool = True,
                    async_writer: Any = None) -> str:
    """Save a checkpoint collectively (every rank calls this); returns its directory.

    With ``async_writer`` (an ``async_checkpoint.AsyncCheckpointWriter``) the tensors are
    written in the background: the directory is renamed and becomes the latest only when the
    writer finalizes the save on every rank; until then the previous checkpoint is the latest.
    """
    final = checkpoint_dir(save_dir, iteration)
    if read_tracker(save_dir) == iteration and os.path.isdir(final):
        logger.info("checkpoint %s already exists and is the latest: not saving again", final)
        return final
    staging = final + ".partial"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted save
        os.makedirs(staging)
    dist.barrier()

    _finish_param_gather(model_chunks)
    state: dict[str, Any] = _model_sharded_state_dict(model_chunks)
    if save_rng:
        state["rng_state"] = _rng_sharded_object()
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(_model_part(state))
        state["optimizer_format"] = optimizer.format  # a load checks it (_check_optimizer_format)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    # args stays a dict (not Megatron-LM's Namespace): our readers (HF export, --load checks)
    # index it; Megatron-LM's consumed_train_samples is added under its name.
    state.update(args={**args, "consumed_train_samples": consumed_samples, "has_rng_state": save_rng},
                 iteration=iteration, consumed_samples=consumed_samples,
                 checkpoint_version=CHECKPOINT_VERSION)
    request = _write_or_clean_up(state, staging, final, save_dir, iteration,
                                 background=async_writer is not None)
    if request is not None:
        request.add_finalize_fn(functools.partial(_publish, save_dir, staging, final, iteration))
        async_writer.schedule(request, final, save_dir, staging, read_tracker(save_dir))
        return final
    _publish(save_dir, staging, final, iteration)
    return final


def _publish(save_dir: str, staging: str, final: str, iteration: int) -> None:
    """Once every rank's shards are on disk: rename the directory, then move the tracker."""
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        if os.path.isdir(final):  # a stale, never-tracked directory from an earlier run
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_tracker(save_dir, iteration)  # last: the checkpoint is now the latest
    dist.barrier()


def _write_or_clean_up(state: dict[str, Any], staging: str, final: str, save_dir: str,
                       iteration: int, background: bool = False) -> Any:
    """Write ``state`` into ``staging`` on every rank, or fail on every rank.

    Refused before anything is written (every rank agrees, the process group stays usable): a
    checkpoint whose weights or optimizer state hold NaN/Inf, or a disk with less free space
    than the previous checkpoint took. A write that fails anyway (full disk, I/O error) removes
    the partial directory and names the free space (``checkpoint_safety.agree_on_failed_save``).
    With ``background`` only the planning is done here: returns megatron-core's AsyncRequest.
    """
    rank = dist.get_rank()
    latest = read_tracker(save_dir)
    needed = checkpoint_size(checkpoint_dir(save_dir, latest)) if latest is not None else 0
    local = (first_non_finite(state), free_bytes(save_dir))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    failed: Optional[BaseException] = None
    bad = next(((r, name) for r, (name, _) in enumerate(gathered) if name), None)
    short = next(((r, free) for r, (_, free) in enumerate(gathered)
                  if free is not None and free < needed), None)
    if bad is not None:
        failed = NonFiniteCheckpointError(
            f"iteration {iteration}: {bad[1]} (rank {bad[0]}) holds NaN or Inf; checkpoint {final} "
            f"was not written and {os.path.join(save_dir, TRACKER_FILENAME)} still names iteration "
            f"{latest}")
    elif short is not None:
        failed = CheckpointSaveError(save_failed_message(
            final, save_dir, f"not enough space: the previous checkpoint took {format_bytes(needed)}",
            latest))
    else:
        try:
            return dist_checkpointing.save(state, staging, sharded_strategy=("torch_dist", 1),
                                           async_sharded_save=background)
        except Exception as err:  # noqa: BLE001 -- every rank must learn that the save failed
            # megatron-core's save ends in a barrier: having returned on one rank means every
            # rank got there. A rank that raised may have left the others waiting inside it.
            reason = agree_on_failed_save(f"{final}", err)
            failed = CheckpointSaveError(save_failed_message(final, save_dir, reason, latest))
    if failed is not None:
        # Every rank removes the partial directory (idempotent on a shared file system): after
        # an abort there is no barrier left to wait for rank 0's removal, and a rank must not
        # report "removed" while its view still holds the directory.
        shutil.rmtree(staging, ignore_errors=True)
        if dist.is_initialized():  # not after an abort
            dist.barrier()
        raise failed


# ---- load -------------------------------------------------------------------------------------
def _warn_once(message: str) -> None:
    if dist.get_rank() == 0:
        logger.warning(message)


def load_checkpoint(load_dir: str, model_chunks: Sequence[torch.nn.Module], optimizer: Any = None,
                    scheduler: Any = None, *, load_rng: bool = True) -> dict[str, Any]:
    """Load the latest checkpoint of ``load_dir`` into the given objects (collective call).

    Returns ``{"iteration", "consumed_samples", "args"}``; iteration 0 and args None when
    ``load_dir`` holds no checkpoint yet (a fresh run that saves to the same directory).
    """
    path = _resolve(load_dir)
    if path is None:
        return {"iteration": 0, "consumed_samples": 0, "args": None}
    common = dist_checkpointing.load_common_state_dict(path)
    saved_args = common["args"]

    request: dict[str, Any] = _model_sharded_state_dict(model_chunks)
    if optimizer is not None and "optimizer" not in common:
        _warn_once(f"{path} holds no optimizer state: the optimizer starts fresh")
        optimizer = None
    if optimizer is not None:
        saved_format = _check_optimizer_format(path, common, optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(_model_part(request),
                                                            is_loading=True, saved_format=saved_format)
    dp_cp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    same_layout = (
        saved_args.get("tensor_model_parallel_size") == parallel_state.get_tensor_model_parallel_world_size()
        and saved_args.get("pipeline_model_parallel_size") == parallel_state.get_pipeline_model_parallel_world_size()
        and saved_args.get("data_parallel_size", 0) * saved_args.get("context_parallel_size", 1) == dp_cp
    )
    if load_rng and not saved_args.get("has_rng_state", True):
        _warn_once(f"{path} holds no RNG states (--no-save-rng): they are not restored")
    elif load_rng and same_layout:
        request["rng_state"] = _rng_sharded_object(for_loading=True)
    elif load_rng:
        _warn_once(f"{path} was saved with another TP/PP/DP layout: RNG states not restored")

    loaded = dist_checkpointing.load(request, path)

    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"], saved_format)
    if scheduler is not None and _scheduler_state(common) is not None:
        scheduler.load_state_dict(_scheduler_state(common))
    if "rng_state" in request:
        rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        _set_local_rng_state(loaded["rng_state"][rank])
    return {"iteration": int(common["iteration"]),
            "consumed_samples": int(common.get("consumed_samples", 0)), "args": dict(saved_args)}
