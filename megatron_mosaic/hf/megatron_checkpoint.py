"""Read a Megatron distributed checkpoint into full tensors without building the model.

A checkpoint written by megatron_mosaic.training.checkpointing (torch_dist format) stores every
parameter by a global key and offset, whatever the TP/PP/CP layout was: the DCP metadata gives
the full shape, so allocating full-size tensors and letting torch.distributed.checkpoint fill
them merges every shard (platform facts). Megatron stacks homogeneous layers into one tensor
with a leading layer axis (``decoder.layers.X`` of shape (L, ...)); they are split back into the
per-layer names of a TP=1, PP=1 model's ``state_dict()`` (``decoder.layers.{i}.X``).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")

# Megatron's local GPT layer checkpoints its norms under Transformer Engine's fused names
# (TransformerLayer's sharded_state_dict_keys_map); the module state_dict names are these.
_CHECKPOINT_KEY_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


class CheckpointError(ValueError):
    """The directory is not a readable, complete Megatron checkpoint (message names the file)."""


@dataclass
class MegatronCheckpoint:
    """One iteration of a checkpoint, merged.

    path:      the iteration directory read.
    iteration: training iteration stored in it.
    consumed_samples: training samples consumed up to that iteration.
    args:      the run arguments (dict) stored in its common state.
    tensors:   full model tensors by TP=1/PP=1 state_dict name (no ``_extra_state``).
    """

    path: str
    iteration: int
    consumed_samples: int
    args: dict
    tensors: dict[str, Tensor]


def find_iteration_dir(load_dir: str) -> str:
    """The iteration directory of ``load_dir``: itself if it is one, else via the tracker file."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    if os.path.isfile(os.path.join(load_dir, "metadata.json")):
        return load_dir
    tracker = os.path.join(load_dir, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        raise CheckpointError(
            f"--load {load_dir}: not a Megatron checkpoint directory (neither {TRACKER_FILENAME} "
            "nor an iteration directory with metadata.json)"
        )
    text = open(tracker, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    path = os.path.join(load_dir, f"iter_{int(text):07d}")
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"{tracker} names iteration {int(text)} but {path}/metadata.json does not exist")
    return path


def _read_common(path: str) -> dict:
    common_file = os.path.join(path, "common.pt")
    if not os.path.isfile(common_file):
        raise CheckpointError(f"{common_file}: missing (the checkpoint's common state with its arguments)")
    try:
        common = torch.load(common_file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{common_file}: cannot be read ({err})") from err
    if not isinstance(common, dict) or not isinstance(common.get("args"), dict):
        raise CheckpointError(f"{common_file}: holds no 'args' dict (not written by megatron_mosaic)")
    return common


def _read_metadata(path: str):
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as err:
        raise CheckpointError(f"{path}/.metadata: cannot be read as a torch_dist checkpoint ({err})") from err
    # Every byte range the metadata points at must exist: a missing or truncated shard file
    # would otherwise surface as an obscure error deep inside the loader (or not at all).
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: shard file missing (named by {path}/.metadata)")
        if os.path.getsize(file) < size:
            raise CheckpointError(f"{file}: truncated ({os.path.getsize(file)} bytes, metadata needs {size})")
    return metadata


def _load_full(path: str, metadata, keys: list[str]) -> dict[str, Tensor]:
    state = {}
    for key in keys:
        meta = metadata.state_dict_metadata[key]
        state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, storage_reader=FileSystemReader(path), no_dist=True)
    return state


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _per_layer_names(stored: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Split stacked ``decoder.layers.X`` (L, ...) tensors; merge SwiGLU ``_w``/``_v`` halves."""
    out: dict[str, Tensor] = {}
    for key in list(stored):
        tensor = stored.pop(key)  # dropped as it is split: peak memory ~ model + one tensor
        if key.startswith("decoder.layers.") and not _LAYER_KEY.match(key):
            rest = key[len("decoder.layers."):]
            if tensor.dim() == 0 or tensor.shape[0] != num_layers:
                raise CheckpointError(
                    f"checkpoint tensor {key} has shape {tuple(tensor.shape)}: expected a leading axis "
                    f"of num_layers={num_layers} (the stacked layers)"
                )
            for layer in range(num_layers):
                out[f"decoder.layers.{layer}.{rest}"] = tensor[layer].clone()
        else:
            out[key] = tensor
    for key in [k for k in out if k.endswith("_w")]:
        base, sibling = key[:-2], key[:-2] + "_v"
        if sibling in out and base not in out:  # Megatron's singleton-shard SwiGLU fc1 halves
            out[base] = torch.cat([out.pop(key), out.pop(sibling)], dim=0)
    renamed: dict[str, Tensor] = {}
    for key, tensor in out.items():
        match = _LAYER_KEY.match(key)
        if match and match.group(2) in _CHECKPOINT_KEY_ALIASES:
            key = f"decoder.layers.{match.group(1)}.{_CHECKPOINT_KEY_ALIASES[match.group(2)]}"
        if key in renamed:
            raise CheckpointError(f"checkpoint holds {key} twice (under two stored names)")
        renamed[key] = tensor
    return renamed


def read_megatron_checkpoint(load_dir: str) -> MegatronCheckpoint:
    """Merge the latest checkpoint of ``load_dir`` (or the iteration directory itself)."""
    path = find_iteration_dir(load_dir)
    common = _read_common(path)
    args = dict(common["args"])
    num_layers = args.get("num_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise CheckpointError(f"{path}/common.pt: args.num_layers is {num_layers!r}")
    metadata = _read_metadata(path)
    keys = [
        key
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_KEY_PREFIXES) and isinstance(meta, TensorStorageMetadata)
    ]
    if not keys:
        raise CheckpointError(f"{path}: the checkpoint holds no model tensors")
    stored = _load_full(path, metadata, keys)
    return MegatronCheckpoint(
        path=path, iteration=int(common.get("iteration", 0)), consumed_samples=int(common.get("consumed_samples", 0)),
        args=args, tensors=_per_layer_names(stored, num_layers),
    )
