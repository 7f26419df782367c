"""The model kinds ``--model`` chooses from, and the facts about each that the training code reads.

One ``ModelKind`` per kind in ``KINDS`` (keyed by the --model name, in --help order): arguments,
flag checks, the model builder, the FLOPs count, the training loop and checkpoint checks read these
facts instead of comparing model names. Stdlib only: arguments are parsed before torch is imported.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Optional


def _causal_pairs(args: argparse.Namespace) -> float:
    """Softmax attention: query t sees keys 0..t (t + 1 pairs)."""
    return (args.seq_length + 1) / 2


def _earlier_pairs(args: argparse.Namespace) -> float:
    """v1's contextual memory: query t retrieves the t earlier pairs."""
    return (args.seq_length - 1) / 2


def _short_and_long_term_pairs(args: argparse.Namespace) -> float:
    """v2: short-term memory min(t, h - 1) pairs, plus long-term memory's pairs at least m back,
    averaged over the training delays m ~ U{low..high}."""
    T, h = args.seq_length, args.short_term_window
    short = sum(min(t, h - 1) for t in range(T)) / T
    low, high = args.long_term_delay_range
    delays = range(low, high + 1)
    long = sum(max(T - m, 0) * max(T - m + 1, 0) / 2 for m in delays) / (len(delays) * T)
    return short + long


@dataclass(frozen=True)
class ModelKind:
    name: str  # the --model choice
    mosaic_version: Optional[int]  # 1 or 2 (MosaicModel), None for the GPT baseline
    swiglu: bool  # has a SwiGLU MLP (v1 has none: its persistent memory replaces it)
    tied_output: bool  # the output layer reuses the embedding (v1, as the paper)
    attention_dropout: float  # --attention-dropout's default (the only value for Mosaic memories)
    normalization: str  # Megatron-LM's --normalization value this kind uses
    position_embedding: str  # Megatron-LM's --position-embedding-type value ("rope" or "none")
    long_term_delay: bool  # draws a long-term memory delay m per training step (v2)
    transformer_engine: bool  # has a Transformer Engine layer spec (--transformer-impl, --fp8-format)
    shape_args: tuple[str, ...]  # arguments beyond the common ones that fix its checkpoint's shapes
    visible_pairs: Callable[[argparse.Namespace], float]  # (query, key) pairs per token per layer

    @property
    def is_mosaic(self) -> bool:
        return self.mosaic_version is not None


KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (
    ModelKind("mosaic-v1", mosaic_version=1, swiglu=False, tied_output=True, attention_dropout=0.0,
              normalization="LayerNorm", position_embedding="none", long_term_delay=False,
              transformer_engine=True, shape_args=("persistent_memory_size", "disable_bias_linear"),
              visible_pairs=_earlier_pairs),
    ModelKind("mosaic-v2", mosaic_version=2, swiglu=True, tied_output=False, attention_dropout=0.0,
              normalization="RMSNorm", position_embedding="none", long_term_delay=True,
              transformer_engine=True, shape_args=("ffn_hidden_size",),
              visible_pairs=_short_and_long_term_pairs),
    ModelKind("gpt", mosaic_version=None, swiglu=True, tied_output=False, attention_dropout=0.1,
              normalization="RMSNorm", position_embedding="rope", long_term_delay=False,
              transformer_engine=False, shape_args=("ffn_hidden_size",),
              visible_pairs=_causal_pairs),
)}


def kind_of(args: argparse.Namespace) -> ModelKind:
    """The registry entry of ``args.model``."""
    return KINDS[args.model]
