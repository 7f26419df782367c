"""The pieces a checkpoint is made of, and the checks a load makes against them.

``checkpointing`` assembles them into a save (staging, publish, clean-up) and a load; kept here:

- where a checkpoint lives: ``iter_N`` directories and the tracker file naming the latest one;
- the model's sharded state dict (one entry per virtual pipeline chunk, wrappers removed);
- the RNG states of every DP x CP replica as one sharded object per (PP, TP) position;
- the saved run arguments, and what a load checks with them: that this run's optimizer reads
  the saved optimizer format, the scheduler state of either checkpoint version, and that
  ``--load`` holds a model of the same shape (``check_checkpoint_matches``).
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_mosaic.training.model_kinds import KINDS

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


# ---- tracker ----------------------------------------------------------------------------------
def _write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, TRACKER_FILENAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER_FILENAME))


# ---- load checks ------------------------------------------------------------------------------
def read_checkpoint_args(load_dir: str) -> dict[str, Any]:
    """The run arguments stored in the latest checkpoint of ``load_dir`` (no model needed)."""
    path = _resolve(load_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {load_dir} (missing {TRACKER_FILENAME})")
    return dict(dist_checkpointing.load_common_state_dict(path)["args"])


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
