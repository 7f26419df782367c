"""Initialisation RNG streams: the same seed gives the same initial weights at every layout.

With one process RNG stream, a module's initial weights depend on everything the process built
before it: the second pipeline stage's first layer would draw what the single-process model's
embedding and first layers drew. Instead every part of a model draws from its own stream,
seeded by ``(config.init_seed, stream name)``:
- each layer from ``layer_stream(global layer number)`` (1-based, as Megatron numbers layers);
- the embedding, output layer and final norm from ``EMBEDDING``, ``OUTPUT_LAYER``, ``FINAL_NORM``.
So TP, PP, virtual PP, CP and DP ranks build exactly the single-process weights (TP splits a
full master weight drawn on the CPU; see ``use_cpu_initialization``).

Streams are scopes: the CPU and CUDA generators, and Megatron's CUDA RNG tracker (GPU
initialisation draws from its model-parallel stream), are reseeded on entry and restored on
exit, so building a model leaves the runtime streams (dropout, sampling) as they were.
``config.init_seed = None`` (the default) keeps the old behaviour: draw from the ambient
generators, in construction order.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import get_pg_rank, get_pg_size

EMBEDDING = "embedding"
OUTPUT_LAYER = "output_layer"
FINAL_NORM = "final_norm"
CONSTRUCTION = "construction"
"""A scope around a whole foreign constructor (Megatron's GPTModel) whose parts are then put in
their own streams: keeps its leftover draws off the caller's generators."""


def layer_stream(global_layer_number: int) -> str:
    """The stream of the layer numbered ``global_layer_number`` (1-based) in the whole model."""
    return f"layer{global_layer_number}"


def stream_seed(seed: int, stream: str) -> int:
    """A generator seed for ``stream``, a pure function of (seed, stream) (no PYTHONHASHSEED).

    Kept below 2**62: Megatron adds small offsets to it for its tracker streams (2718 + TP rank,
    1024 + 100·EP rank), and generator seeds must fit in 64 bits.
    """
    digest = hashlib.blake2b(f"megatron-mosaic-init:{seed}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def init_seed_of(config: Any) -> Optional[int]:
    """The model's initialisation seed (MosaicConfig / GPTBaselineConfig ``init_seed``)."""
    return getattr(config, "init_seed", None)


def global_layer_number(config: Any, layer_number: int, vp_stage: Optional[int],
                        pg_collection: Optional[ProcessGroupCollection]) -> int:
    """A block-local 1-based layer number made global, exactly as TransformerLayer does."""
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    return layer_number + get_transformer_layer_offset(config, vp_stage, get_pg_rank(pg_collection.pp))


@contextlib.contextmanager
def _tracker_streams(seed: int) -> Iterator[None]:
    """Megatron's CUDA RNG tracker reseeded from ``seed`` for the scope, then restored."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    was_initialized = tracker.is_initialized()
    states, seeds = tracker.get_states(), set(getattr(tracker, "seeds_", ()))
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        tracker.reset()
        if was_initialized:
            tracker.set_states(states)
        if hasattr(tracker, "seeds_"):
            tracker.seeds_ = seeds  # add() refuses seeds it has seen: keep the runtime bookkeeping


@contextlib.contextmanager
def init_rng(seed: Optional[int], stream: str) -> Iterator[None]:
    """Draw everything built inside from ``stream`` of ``seed``; no-op when ``seed`` is None."""
    if seed is None:
        yield
        return
    value = stream_seed(seed, stream)
    cuda = torch.cuda.is_available()
    devices = [torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(value)
        if not cuda:
            yield
            return
        torch.cuda.manual_seed(value)
        with _tracker_streams(value):
            yield


class SeededBuild:
    """Spec module that builds ``inner`` inside ``init_rng(config.init_seed, stream)``.

    A class whose ``__new__`` returns the built module, because Megatron's ``build_module``
    returns plain functions uncalled. Use ``seeded_spec`` to make one.
    """

    def __new__(cls, *args: Any, inner: Any, stream: str, config: Any, **kwargs: Any):
        with init_rng(init_seed_of(config), stream):
            return build_module(inner, *args, config=config, **kwargs)


def seeded_spec(inner: Any, stream: str) -> ModuleSpec:
    """``inner`` (a spec or module class) built in its own initialisation stream."""
    return ModuleSpec(module=SeededBuild, params={"inner": inner, "stream": stream})


def redraw_vocab_weight(weight: Optional[torch.nn.Parameter], vocab_size: int, init_method: Callable,
                        config: Any, tp_group, stream: str, *, params_dtype: torch.dtype = torch.float32) -> None:
    """Draw a vocabulary-parallel weight (this TP rank's rows of vocab x hidden) again from
    ``stream``, the way Megatron's VocabParallelEmbedding / ColumnParallelLinear draw it.

    For modules built inside Megatron's GPTModel, which gives no hook around their construction.
    ``params_dtype`` is what the original constructor passed (the embedding passes
    config.params_dtype, ColumnParallelLinear leaves fp32).
    """
    seed = init_seed_of(config)
    if seed is None or weight is None or not config.perform_initialization:
        return
    with init_rng(seed, stream), torch.no_grad():
        if config.use_cpu_initialization:  # full master weight on the CPU, this rank's rows kept
            _initialize_affine_weight_cpu(
                weight, vocab_size, weight.shape[1], weight.shape[0], 0, init_method, params_dtype=params_dtype,
                rank=get_pg_rank(tp_group), world_size=get_pg_size(tp_group),
                skip_set_tensor_parallel_attributes=True,  # the constructor set them
            )
        else:  # _initialize_affine_weight_gpu's draw, without setting the TP attributes again
            with tensor_parallel.get_cuda_rng_tracker().fork():
                init_method(weight)
