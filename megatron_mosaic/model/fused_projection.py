"""One column-parallel GEMM for all projections a memory applies to the same input.

A memory projects its (normed) input several times: v2 into key, gate, decay and value (W_φ,
W_g, W_λ, W_v), v1's contextual memory into key and value, v1's persistent memory into key.
Separate linears cost one small GEMM and its launches each, and v2's (H/TP, d) gate and decay
weights are not legal FP8 GEMM shapes (Transformer Engine needs dimensions divisible by 16).
So each memory owns ONE ColumnParallelLinear (or TE linear) whose per-rank output is

    [this rank's heads of part 1 ; ... of part n ; zero pad up to a multiple of 16]

interleaved per TP rank like Megatron's fused QKV: rank r's slice holds exactly its heads of
every part, so the head split (and TP=n == TP=1) is that of the separate linears.

Pad rows are zero at construction and stay zero: their outputs are sliced away, so their
weight (and bias) gradients are exactly zero; Adam's update of a zero gradient from zero
moments is zero and decoupled weight decay of a zero weight is zero
(tests/model/test_fused_projection.py checks both).

Checkpoints keep the separate layout: ``sharded_state_dict`` stores each part under its old
name (``key_extractor.linear_key.weight`` ...) through a ShardedTensorFactory that splits on save
and concatenates (with the zero pad) on load, for the weights and the optimizer's moments alike.
So checkpoints are independent of TP and of the padding, and checkpoints written before the
fusion load unchanged. ``logical_tensors`` / ``fused_tensors`` give the same view of in-memory
state dicts, for the converters (HF import, official v1 import) and the tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default
from torch import Tensor

from .module import MosaicModule

FP8_MULTIPLE = 16  # Transformer Engine's FP8 GEMMs need both dimensions divisible by 16


@dataclass(frozen=True)
class Part:
    """One projection inside the fused GEMM.

    name:     its linear's name relative to the owning memory, as the separate linear was
              called ("key_extractor.linear_key"): the checkpoint and converter name.
    per_head: its output channels per head (head size for keys/values, 1 for gate/decay).
    """

    name: str
    per_head: int


def padded_width(width: int) -> int:
    return -(-width // FP8_MULTIPLE) * FP8_MULTIPLE


class FusedProjection(MosaicModule):
    """x [s, b, d] -> one [s, b, H_local·per_head] tensor per part (views of one GEMM output).

    Parts are drawn in the order given, each from ``init_method`` exactly as a separate
    ColumnParallelLinear of that part would draw it (the full master weight on the CPU under
    ``use_cpu_initialization``, this rank's rows from Megatron's model-parallel CUDA stream
    otherwise), so the initial weights are the separate linears' and do not depend on TP.
    """

    def __init__(self, config, linears, parts: Sequence[Part], init_method: Callable, bias: bool, tp_group=None,
                 draw: bool = True):
        """``draw`` False: the parts are left for ``draw(indices, ...)`` calls by the owner, which
        can then interleave them with its other draws (the order the separate modules drew in)."""
        from .extractors import column_linear  # extractors imports this module's users

        super().__init__(config, tp_group)
        heads = config.num_attention_heads
        if heads % self.tp_size:
            raise ValueError(f"{heads} heads cannot be split over {self.tp_size} TP ranks")
        local_heads = heads // self.tp_size
        self.parts = tuple(parts)
        self.widths = [local_heads * part.per_head for part in self.parts]
        self.local_width = padded_width(sum(self.widths))
        self.pad = self.local_width - sum(self.widths)
        quiet = copy.copy(config)  # the linear must not draw: the parts are drawn one by one below
        quiet.perform_initialization = False
        self.linear = column_linear(linears, quiet, config.hidden_size, self.local_width * self.tp_size,
                                    init_method, bias, self.tp_group)
        if not hasattr(self.linear.weight, "tensor_model_parallel"):
            # Megatron marks the weight TP-split only inside its own initialisation, skipped
            # here; unmarked, the gradient norm and clipping would count it on TP rank 0 only.
            set_tensor_model_parallel_attributes(self.linear.weight, is_parallel=True, dim=0, stride=1)
        with torch.no_grad():
            # Always, also when the weights come from a checkpoint later: uninitialised pad rows
            # could hold NaN bits, and 0 · NaN would reach the input gradient.
            self.linear.weight[sum(self.widths):].zero_()
            if self.linear.bias is not None:
                self.linear.bias.zero_()
        if draw:
            self.draw(range(len(self.parts)), init_method)

    @torch.no_grad()
    def draw(self, indices, init_method: Callable) -> None:
        """Draw the parts at ``indices``, in that order (nothing without perform_initialization)."""
        if not self.config.perform_initialization:
            return
        pieces = self.split(self.linear.weight)
        for i in indices:
            rows = self.config.num_attention_heads * self.parts[i].per_head
            pieces[i].copy_(self._draw(self.config, init_method, rows, pieces[i]))

    def _draw(self, config, init_method: Callable, full_rows: int, piece: Tensor) -> Tensor:
        if config.use_cpu_initialization:  # as _initialize_affine_weight_cpu: full fp32 master, our rows
            master = torch.empty(full_rows, piece.shape[1], dtype=torch.float32)
            init_method(master)
            rows = piece.shape[0]
            return master.to(config.params_dtype)[self.tp_rank * rows:(self.tp_rank + 1) * rows]
        local = torch.empty_like(piece)  # as _initialize_affine_weight_gpu
        with tensor_parallel.get_cuda_rng_tracker().fork():
            init_method(local)
        return local

    def split(self, tensor: Tensor) -> list[Tensor]:
        """A tensor laid out like the fused output rows (weight, bias, their grads or moments)
        -> this rank's piece of each part (views, pad dropped)."""
        return list(tensor.split([*self.widths, self.pad], dim=0)[: len(self.parts)])

    def merge(self, pieces: Sequence[Tensor]) -> Tensor:
        """Inverse of ``split``: the parts' pieces and a zero pad."""
        first = pieces[0]
        pad = torch.zeros(self.pad, *first.shape[1:], dtype=first.dtype, device=first.device)
        return torch.cat([*pieces, pad], dim=0)

    def forward(self, x: Tensor, together: int = 1) -> tuple[Tensor, ...]:
        """One tensor per part, or per run of ``together`` consecutive parts (views either way)."""
        out = self.linear(x)[0]
        widths = [sum(self.widths[i:i + together]) for i in range(0, len(self.widths), together)]
        return tuple(out.split([*widths, self.pad], dim=-1)[: len(widths)])

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The linear's state with its weight and bias stored as the separate parts (see the
        module docstring); its ``_extra_state`` (Transformer Engine's FP8 metadata) is stored
        where the first part's was."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = sharded_state_dict_default(self.linear, f"{prefix}linear.", sharded_offsets, metadata,
                                             tp_group=self.tp_group)
        own_name = prefix.rstrip(".").rpartition(".")[2]  # this module's attribute name in its owner
        for local_key, entry in list(sharded.items()):
            attr = local_key[len(f"{prefix}linear."):]
            if isinstance(entry, ShardedTensor) and attr in ("weight", "bias"):
                sharded[local_key] = self._factory(entry, f"{own_name}.linear.{attr}", attr, sharded_offsets)
            elif isinstance(entry, ShardedObject) and attr == "_extra_state":
                old = f"{self.parts[0].name}._extra_state"
                sharded[local_key] = replace(entry, key=_rename(entry.key, f"{own_name}.linear._extra_state", old))
        return sharded

    def _factory(self, entry: ShardedTensor, suffix: str, attr: str, sharded_offsets: tuple) -> ShardedTensorFactory:
        prepend = len(sharded_offsets)

        @torch.no_grad()
        def build(key: str, tensor: Tensor, replica_id, flattened_range):
            if flattened_range is not None:
                raise NotImplementedError(
                    "fused memory projections cannot be saved in flattened (dp_reshardable) distributed-"
                    "optimizer checkpoints; use the default fully_sharded_model_space format")
            return [
                ShardedTensor.from_rank_offsets(
                    _rename(key, suffix, f"{part.name}.{attr}"), piece, *sharded_offsets,
                    (prepend, self.tp_rank, self.tp_size), replica_id=replica_id, prepend_axis_num=prepend,
                )
                for part, piece in zip(self.parts, self.split(tensor))
            ]

        def merge(pieces):
            with torch.no_grad():
                return self.merge(pieces)

        return ShardedTensorFactory(entry.key, entry.data, build, merge, entry.replica_id)


def _rename(key: str, suffix: str, new_suffix: str) -> str:
    if not key.endswith(suffix):
        raise ValueError(f"checkpoint key {key!r} does not end with {suffix!r}")
    return key[: len(key) - len(suffix)] + new_suffix


def _fused_modules(model: torch.nn.Module) -> dict[str, FusedProjection]:
    """Every FusedProjection of ``model`` by its module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, FusedProjection)}


def logical_tensors(model: torch.nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` keyed like the model's parameters (a state dict, its gradients, ...) with each
    fused projection's weight and bias replaced by the parts' tensors under their separate names
    (this rank's shards; views, pad dropped). The pieces keep the TP attributes of the fused
    parameter (split on dim 0), so TP slicing helpers treat them like the old linears."""
    out = dict(tensors)
    for name, module in _fused_modules(model).items():
        owner = name.rpartition(".")[0]
        owner = f"{owner}." if owner else ""
        for attr in ("weight", "bias"):
            fused = out.pop(f"{name}.linear.{attr}", None)
            if fused is None:
                continue
            for part, piece in zip(module.parts, module.split(fused)):
                piece.tensor_model_parallel, piece.partition_dim, piece.partition_stride = True, 0, 1
                out[f"{owner}{part.name}.{attr}"] = piece
    return out


def fused_tensors(model: torch.nn.Module, logical: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``logical_tensors``: parts merged into the fused weights (zero pad). Parts of
    a fused tensor that are all absent leave it absent; some absent is a KeyError naming them."""
    out = dict(logical)
    for name, module in _fused_modules(model).items():
        owner = name.rpartition(".")[0]
        owner = f"{owner}." if owner else ""
        for attr in ("weight", "bias"):
            keys = [f"{owner}{part.name}.{attr}" for part in module.parts]
            present = [k for k in keys if k in out]
            if not present:
                continue
            if len(present) != len(keys):
                raise KeyError(f"{sorted(set(keys) - set(present))} missing: the fused {name}.linear.{attr} "
                               f"needs all of {keys}")
            out[f"{name}.linear.{attr}"] = module.merge([out.pop(k) for k in keys])
    return out
