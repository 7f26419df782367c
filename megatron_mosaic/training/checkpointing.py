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
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

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
from megatron_mosaic.training.model_kinds import KINDS

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
# 2: the learning-rate scheduler is saved as "opt_param_scheduler" (Megatron-LM's key) and counts
# samples as Megatron-LM's does; 1 saved it as "scheduler", counting iterations (still loads).
CHECKPOINT_VERSION = 2


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """Iteration named by ``root``'s tracker file, or None when there is no checkpoint."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, found {text!r}") from None


def _resolve(load_dir: str) -> Optional[str]:
    """The iteration directory to load: via the tracker, or ``load_dir`` itself if it is one."""
    if os.path.isfile(os.path.join(load_dir, "metadata.json")):
        return load_dir
    iteration = read_tracker(load_dir)
    if iteration is None:
        return None
    path = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{os.path.join(load_dir, TRACKER_FILENAME)} names iteration "
                                f"{iteration} but {path} does not exist")
    return path


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):  # Megatron DDP / Float16Module wrappers
        chunk = chunk.module
    return chunk


def _model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    chunks = [_unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _finish_param_gather(model_chunks: Sequence[torch.nn.Module]) -> None:
    """--overlap-param-gather leaves the all-gather of the last step's parameters to the next
    forward: finish it here, or other ranks' shards of the weights would be saved stale."""
    for chunk in model_chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


def _model_part(sharded: dict[str, Any]) -> dict[str, Any]:
    # Kept nested: virtual-pipeline chunks reuse local dict keys ("decoder.layers.0...").
    return {k: v for k, v in sharded.items() if k.startswith("model")}


# ---- RNG --------------------------------------------------------------------------------------
def _local_rng_state() -> dict[str, Any]:
    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_local_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(for_loading: bool = False) -> ShardedObject:
    """One object per (PP, TP) position holding the states of all its DP x CP replicas."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    states: list[Any] = [None] * dist.get_world_size(group)
    if not for_loading:
        dist.all_gather_object(states, _local_rng_state(), group=group)
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size())
    offset = (parallel_state.get_pipeline_model_parallel_rank(),
              parallel_state.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", states, shape, offset,
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


# ---- save -------------------------------------------------------------------------------------
def _write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, TRACKER_FILENAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER_FILENAME))


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


def read_checkpoint_args(load_dir: str) -> dict[str, Any]:
    """The run arguments stored in the latest checkpoint of ``load_dir`` (no model needed)."""
    path = _resolve(load_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {load_dir} (missing {TRACKER_FILENAME})")
    return dict(dist_checkpointing.load_common_state_dict(path)["args"])


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


# Checkpoints written before megatron-core's optimizer (a torch AdamW) name no format.
_OPTIMIZER_NAMES = {"mosaic-adamw": "the torch AdamW of earlier versions",
                    "megatron": "Megatron's optimizer without --use-distributed-optimizer"}


def _check_optimizer_format(path: str, common: dict[str, Any], optimizer: Any) -> str:
    """The saved optimizer's format, if ``optimizer`` loads it (it names those it can load)."""
    saved, wanted = common.get("optimizer_format", "mosaic-adamw"), optimizer.format
    if saved not in optimizer.loads_formats:
        name = lambda f: _OPTIMIZER_NAMES.get(f, f"Megatron's optimizer with "
                                                 f"--use-distributed-optimizer ({f})")
        raise CheckpointMismatchError(
            f"--load {path}: its optimizer state was saved by {name(saved)} and this run uses "
            f"{name(wanted)}; pass --no-load-optim to load the weights with a fresh optimizer")
    return saved


def _scheduler_state(common: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The scheduler's state in samples; version-1 checkpoints counted iterations."""
    if "opt_param_scheduler" in common:
        return common["opt_param_scheduler"]
    if "scheduler" not in common:
        return None
    state = dict(common["scheduler"])
    batch = int(common["args"]["global_batch_size"])
    for key in ("num_steps", "lr_warmup_steps", "lr_decay_steps", "wd_incr_steps"):
        state[key] = state[key] * batch
    return state


class CheckpointMismatchError(ValueError):
    """--load names a checkpoint of a differently shaped model (the message names the arguments)."""


# Arguments that fix the shapes of the saved tensors: a checkpoint only loads if they agree.
# Fields a model does not use (v1 has no SwiGLU, v2 and gpt no persistent-memory slots) are not compared.
_COMMON_ARCHITECTURE_ARGS = ("model", "num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
ARCHITECTURE_ARGS = {name: _COMMON_ARCHITECTURE_ARGS + kind.shape_args for name, kind in KINDS.items()}


def check_checkpoint_matches(args: Any) -> None:
    """Fail early, naming the arguments, when --load holds a differently shaped model."""
    try:
        saved = read_checkpoint_args(args.load)
    except FileNotFoundError:
        return  # nothing saved yet: a fresh run that will save there
    diffs = [f"--{k.replace('_', '-')} {saved[k]} (checkpoint) vs {getattr(args, k)} (now)"
             for k in ARCHITECTURE_ARGS[args.model] if k in saved and saved[k] != getattr(args, k)]
    if diffs:
        raise CheckpointMismatchError(f"--load {args.load}: the checkpoint's model differs: "
                                      + "; ".join(diffs))
