"""What makes checkpoints safe to rely on: checked before loading, never written damaged.

- ``verify_checkpoint(path)``: every file of a torch_dist checkpoint is present and every byte
  range its ``.metadata`` points at lies inside its file and starts like a stored item, so a
  missing or truncated shard is named (file, tensor) before any model is built or touched.
- ``resolve_load(load, save)``: what ``--load`` means: a checkpoint to load (verified), a
  directory with none yet ("no checkpoint in X, starting from scratch"), or an error.
- ``check_save_dir(save, needed_bytes)``: at start-up, ``--save`` is a directory this process
  can write, with room for one checkpoint; leftovers of interrupted saves are removed.
- ``check_finite(state)``: a checkpoint whose weights or optimizer state hold NaN/Inf is never
  written, so the tracker never names one.
- ``save_failed(...)``: the message of a failed save (directory, free space); the caller has
  removed the partial directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

import torch

from megatron_mosaic.errors import UserError

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
PARTIAL_SUFFIX = ".partial"
_ITEM_MAGIC = b"PK\x03\x04"  # every torch_dist item is a torch.save zip archive


class CheckpointDamagedError(UserError):
    """A checkpoint file is missing, truncated or unreadable (the message names file and tensor)."""


class CheckpointNotFoundError(UserError):
    """--load names a path that does not exist."""


class SaveDirError(UserError):
    """--save is not usable: not a writable directory, or too little free space."""


class CheckpointSaveError(UserError):
    """Writing a checkpoint failed (full disk, I/O error); its partial directory was removed."""


class NonFiniteCheckpointError(UserError):
    """Weights or optimizer state are not finite: the checkpoint was not written."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str) -> Optional[int]:
    """Free space for this user on the file system holding ``path`` (or its nearest parent)."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path.rstrip(os.sep))
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


# ---- verifying a checkpoint before loading it --------------------------------------------------
def _item_name(index: Any) -> str:
    fqn = index.fqn
    if "/shard_" in fqn:  # a ShardedObject: "rng_state/shard_0_2"
        return f"object {fqn.split('/shard_')[0]!r}"
    offset = "" if index.offset is None else f" at offset {tuple(index.offset)}"
    return f"tensor {fqn!r}{offset}"


def verify_checkpoint(path: str) -> None:
    """Raise CheckpointDamagedError naming the file (and the tensor) if ``path``, an iteration
    directory, is not a complete checkpoint. Reads the metadata, the common state and a few
    bytes per stored item; the tensors themselves are read by the load."""
    config_file = os.path.join(path, "metadata.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        backend = config["sharded_backend"]
    except FileNotFoundError:
        raise CheckpointDamagedError(f"{config_file}: missing (not a complete checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointDamagedError(f"{config_file}: unreadable ({err})") from None

    common_file = os.path.join(path, "common.pt")
    if not os.path.isfile(common_file):
        raise CheckpointDamagedError(f"{common_file}: missing (the checkpoint's common state)")
    try:
        common = torch.load(common_file, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 -- any unpickling failure means a damaged file
        raise CheckpointDamagedError(f"{common_file}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(common, dict) or "iteration" not in common:
        raise CheckpointDamagedError(f"{common_file}: holds no iteration (not written by megatron_mosaic)")
    if backend != "torch_dist":
        return  # other backends are loaded as they are

    from torch.distributed.checkpoint import FileSystemReader

    meta_file = os.path.join(path, ".metadata")
    if not os.path.isfile(meta_file):
        raise CheckpointDamagedError(f"{meta_file}: missing (the index of the checkpoint's tensors)")
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as err:  # noqa: BLE001
        raise CheckpointDamagedError(f"{meta_file}: unreadable ({type(err).__name__}: {err})") from None

    by_file: dict[str, list[tuple[int, int, Any]]] = {}
    for index, info in metadata.storage_data.items():
        by_file.setdefault(info.relative_path, []).append((info.offset, info.length, index))
    for name in sorted(by_file):
        file = os.path.join(path, name)
        items = sorted(by_file[name], key=lambda item: item[0])
        if not os.path.isfile(file):
            # Name a tensor rather than an object (RNG states, _extra_state) where there is one.
            named = next((item for item in items if "/shard_" not in item[2].fqn), items[0])
            raise CheckpointDamagedError(
                f"{file}: shard file missing; it holds {_item_name(named[2])} and "
                f"{len(items) - 1} more item(s) of this checkpoint")
        size = os.path.getsize(file)
        lost = [item for item in items if item[0] + item[1] > size]
        if lost:
            offset, length, index = lost[0]
            raise CheckpointDamagedError(
                f"{file}: truncated to {size} bytes; {_item_name(index)} needs bytes {offset}.."
                f"{offset + length}" + (f" ({len(lost) - 1} more item(s) lost)" if len(lost) > 1 else ""))
        try:
            with open(file, "rb") as f:
                for offset, length, index in items:
                    f.seek(offset)
                    if f.read(len(_ITEM_MAGIC)) != _ITEM_MAGIC:
                        raise CheckpointDamagedError(
                            f"{file}: {_item_name(index)} at byte {offset} is not a stored item "
                            f"(the file is damaged)")
        except OSError as err:
            raise CheckpointDamagedError(f"{file}: unreadable ({err})") from None


# ---- what --load means -------------------------------------------------------------------------
def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def resolve_load(load: str, save: Optional[str] = None) -> Optional[str]:
    """The verified iteration directory ``--load`` names, or None when there is no checkpoint
    yet (an existing directory without one, or the ``--save`` directory of a first run).

    A path that does not exist is an error, except when it is also ``--save`` (a first run of a
    command that resumes itself: ``--save D --load D``).
    """
    if not os.path.exists(load):
        if _same_path(load, save):
            return None
        raise CheckpointNotFoundError(f"--load {load}: no such directory")
    if not os.path.isdir(load):
        raise CheckpointNotFoundError(f"--load {load}: not a directory")
    if os.path.isfile(os.path.join(load, "metadata.json")):  # an iteration directory itself
        verify_checkpoint(load)
        return load
    tracker = os.path.join(load, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        return None
    try:
        with open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as err:
        raise CheckpointDamagedError(f"{tracker}: unreadable ({err})") from None
    if not text.isdigit():
        raise CheckpointDamagedError(f"{tracker}: expected an iteration number, found {text!r}")
    path = os.path.join(load, f"iter_{int(text):07d}")
    if not os.path.isdir(path):
        raise CheckpointDamagedError(f"{tracker} names iteration {int(text)} but {path} does not exist")
    verify_checkpoint(path)
    return path


# ---- --save ------------------------------------------------------------------------------------
def remove_partial_saves(save: str) -> list[str]:
    """Remove ``iter_*.partial`` directories (saves interrupted by a crash or a kill)."""
    removed = []
    try:
        names = os.listdir(save)
    except OSError:
        return removed
    for name in names:
        if name.startswith("iter_") and name.endswith(PARTIAL_SUFFIX):
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)
            removed.append(name)
    return removed


def check_save_dir(save: str, needed_bytes: int, *, clean: bool) -> None:
    """``--save`` must be a writable directory with ``needed_bytes`` free (created if missing).
    With ``clean`` (one rank per file system) partial saves of a killed run are removed first."""
    try:
        os.makedirs(save, exist_ok=True)
    except OSError as err:
        raise SaveDirError(f"--save {save}: cannot create the directory ({err.strerror})") from None
    if not os.path.isdir(save):
        raise SaveDirError(f"--save {save}: not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=save)
        try:
            os.write(fd, b"0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise SaveDirError(f"--save {save}: not writable ({err.strerror})") from None
    if clean:
        for name in remove_partial_saves(save):
            logger.warning("removed %s: a save that was interrupted", os.path.join(save, name))
    free = free_bytes(save)
    if free is not None and free < needed_bytes:
        raise SaveDirError(f"--save {save}: {format_bytes(free)} free, but one checkpoint needs "
                           f"about {format_bytes(needed_bytes)}")


def global_checkpoint_bytes(model_chunks, with_optimizer: bool) -> int:
    """About the size of one checkpoint (a collective call): the parameters of one data-parallel
    replica in fp32 and, with the optimizer, Adam's two fp32 moments per parameter, + 5%."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    local = 0
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
        for chunk in model_chunks:
            for param in chunk.parameters():
                local += param.numel() * 4 * (3 if with_optimizer else 1)
    total = torch.tensor([float(local)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
    return int(total.item() * 1.05) + (1 << 20)


# ---- never write a non-finite checkpoint -------------------------------------------------------
def first_non_finite(state: Any) -> Optional[str]:
    """Name of the first floating tensor in a (sharded) state dict holding NaN or Inf."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(state):
        tensor, name = value, None
        if not isinstance(value, torch.Tensor):
            tensor, name = getattr(value, "data", None), getattr(value, "key", None)
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
            if not bool(torch.isfinite(tensor).all()):
                return name or f"tensor of shape {tuple(tensor.shape)}"
    return None


def checkpoint_size(path: str) -> int:
    """Bytes of the files of a checkpoint directory (0 if it is gone)."""
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        return 0
    return total


def save_failed_message(final: str, save_dir: str, reason: str, latest: Optional[int]) -> str:
    free = free_bytes(save_dir)
    free_text = "unknown free space" if free is None else f"{format_bytes(free)} free"
    reason = " ".join(str(reason).split())
    if len(reason) > 600:
        reason = reason[:600] + " ..."
    previous = ("there is no earlier checkpoint" if latest is None
                else f"the latest checkpoint is still iteration {latest}")
    return (f"saving {final} failed ({reason}); {save_dir} has {free_text}; the partial "
            f"directory was removed and {previous}")


# ---- agreeing on a save that failed on some ranks ----------------------------------------------
SAVE_FAILURE_GRACE_S = 30.0  # how long a failed rank waits for the others to fail too
_COMMUNICATION_ERRORS = ("Connection closed by peer", "Connection reset", "Broken pipe",
                         "ProcessGroup", "NCCL", "Gloo", "timed out")
_save_attempts = [0]


def _is_communication_error(text: str) -> bool:
    return any(marker.lower() in text.lower() for marker in _COMMUNICATION_ERRORS)


def agree_on_failed_save(what: str, err: BaseException) -> str:
    """Called by each rank whose save raised; returns the reason every failed rank agrees on.

    A save can fail on some ranks only (rank 0 writes the metadata, a full local disk), while
    the others wait for it in megatron-core's next collective. The failed ranks post their
    errors in the distributed store (not through the process group, whose collectives are no
    longer in step); if after ``SAVE_FAILURE_GRACE_S`` some rank has not posted, it is waiting
    in a collective: the process group is aborted, which makes that collective fail there
    too, and the rank posts in turn. The reason is the first rank's error that is not a
    consequence of the abort. After an abort the process group is gone on every rank (the
    run is over anyway; ``dist.is_initialized()`` is False).
    """
    import json
    import time

    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    text = f"rank {rank}: {type(err).__name__}: {err}"
    if world == 1:
        return text
    from torch.distributed.distributed_c10d import _get_default_store

    _save_attempts[0] += 1
    store = dist.PrefixStore(f"megatron_mosaic/failed_save/{_save_attempts[0]}/{what}",
                             _get_default_store())
    store.set(str(rank), json.dumps({"error": text}))
    keys = [str(r) for r in range(world)]
    deadline = time.monotonic() + SAVE_FAILURE_GRACE_S
    while not store.check(keys) and time.monotonic() < deadline:
        time.sleep(0.05)
    aborted = not store.check(keys) or store.check(["aborted"])
    if aborted:
        store.set("aborted", "1")
        _abort_process_group()
        deadline = time.monotonic() + 60.0  # the others' collectives fail at once now
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.05)
    errors = []
    try:
        for key in keys:
            if store.check([key]):
                errors.append(json.loads(store.get(key))["error"])
        if not aborted and store.check(["aborted"]):
            _abort_process_group()  # another rank aborted: this rank's group is broken too
    except Exception:  # noqa: BLE001 -- the store's host may be gone already: use what we have
        pass
    root = next((e for e in errors if not _is_communication_error(e)), None)
    return root or (errors[0] if errors else text)


def _abort_process_group() -> None:
    """Tear the process groups down on this rank: peers waiting in a collective get an error."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from megatron.core import parallel_state

    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort is not None and dist.get_backend() == "nccl":
            abort()
        else:
            dist.destroy_process_group()
    finally:
        parallel_state.destroy_model_parallel()
