"""Decoding cache of a Memory Mosaic: stored pairs that lag one step, and carried key recurrences.

Spec section 6. A value v_t peeks at x_{t+1}, so the pair (k_t, v_t) is only final once the next
token arrives: each memory keeps the last token's key and raw value ṽ as *pending* and files the
pair when the next token comes. The leaky-average key recurrence carries its state instead of
re-running over the prefix. The short-term memory keeps only the pairs a future query can still
see (the last h-1); the contextual (v1) and long-term (v2) memories keep every filed pair, the
long-term visibility rule (delay m) deciding which of them a query reads.

This file is copied verbatim into exported model directories: it imports only torch and
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache


def _map_state(state, fn: Callable[[Tensor], Tensor]):
    """Apply ``fn`` to every tensor field of a dataclass state (RecurrenceState) or tensor."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return fn(state)
    return replace(state, **{f.name: fn(getattr(state, f.name)) for f in fields(state)})


@dataclass
class MemoryCache:
    """Decoding state of one associative memory of one layer, for a batch of B sequences.

    keys, values:     (B, H, N, D) filed pairs (values final, i.e. peeked at their next token).
    positions:        (B, N) int64 global positions of the filed pairs.
    doc_starts:       (B, N) int64 document start of each filed pair.
    pending_key:      (B, H, 1, D) key of the last token seen; its value is not final yet.
    pending_value:    (B, H, 1, D) raw projected value ṽ of the last token (before the peek).
    pending_position, pending_doc_start: (B, 1) int64.
    key_state:        carried state of the key recurrence after the last token (RecurrenceState).
    window:           keep only pairs a query at a later position can see (short-term h), or None.
    """

    window: int | None = None
    keys: Tensor | None = None
    values: Tensor | None = None
    positions: Tensor | None = None
    doc_starts: Tensor | None = None
    pending_key: Tensor | None = None
    pending_value: Tensor | None = None
    pending_position: Tensor | None = None
    pending_doc_start: Tensor | None = None
    key_state: object | None = None

    @property
    def has_pending(self) -> bool:
        return self.pending_key is not None

    @property
    def num_pairs(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(
        self,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        doc_starts: Tensor,
        pending_value: Tensor,
        key_state,
    ) -> None:
        """Keep the pairs of this step: all but the last become filed, the last becomes pending.

        keys, values: (B, H, N, D) every pair a query of this step could read (filed + new), in
        position order, the last one being this step's last token (its value provisional).
        pending_value: (B, H, 1, D) the last token's raw ṽ.
        """
        self.pending_key = keys[:, :, -1:]
        self.pending_value = pending_value
        self.pending_position = positions[:, -1:]
        self.pending_doc_start = doc_starts[:, -1:]
        keys, values = keys[:, :, :-1], values[:, :, :-1]
        positions, doc_starts = positions[:, :-1], doc_starts[:, :-1]
        if self.window is not None:
            # The next query t = p + 1 (p the pending position) sees i >= t - window + 1, and the
            # filed pairs hold consecutive positions ending at p - 1: the last window - 2 survive.
            keep = min(keys.shape[2], self.window - 2)
            start = keys.shape[2] - keep
            keys, values = keys[:, :, start:], values[:, :, start:]
            positions, doc_starts = positions[:, start:], doc_starts[:, start:]
        self.keys, self.values, self.positions, self.doc_starts = keys, values, positions, doc_starts
        self.key_state = key_state

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a batch-dimension operation (reorder, repeat, select) to every tensor held."""
        for name in (
            "keys",
            "values",
            "positions",
            "doc_starts",
            "pending_key",
            "pending_value",
            "pending_position",
            "pending_doc_start",
        ):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        self.key_state = _map_state(self.key_state, fn)


@dataclass
class MosaicLayerCache:
    """All decoding state of one Memory Mosaic layer: one MemoryCache per memory, by name.

    v1: "contextual" (pairs + key state) and "persistent" (key state only);
    v2: "short_term" (window h) and "long_term".
    """

    memories: dict[str, MemoryCache] = field(default_factory=dict)

    # transformers' Cache inspects these on each layer.
    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False
    is_initialized = True

    def get_seq_length(self) -> int:  # the model-level cache answers this
        raise NotImplementedError

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.memories.clear()

    def offload(self) -> None:  # everything stays where the model runs
        pass

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("MosaicCache cannot be cropped: key recurrences cannot be rewound")

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        for memory in self.memories.values():
            memory.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.map_batch(lambda t: t[indices])


class MosaicCache(Cache):
    """Cache for MemoryMosaicForCausalLM.generate(), passed around as ``cache`` (transformers
    >= 5.24) or ``past_key_values`` (earlier 5.x): the model accepts either.

    Besides the per-layer memories it holds the token clock shared by all layers:
    seen_tokens (number of positions processed, pads included), and per sequence the document
    start of the last token and whether that token ended its document (EOD), so the next token's
    document is known without re-reading the prefix.
    """

    def __init__(self, num_layers: int):
        layers = [MosaicLayerCache() for _ in range(num_layers)]
        try:
            super().__init__(layers=layers)
        except TypeError:  # transformers < 4.56: Cache() takes no layers
            super().__init__()
            self.layers = layers
        self.seen_tokens = 0
        self.last_doc_start: Tensor | None = None  # (B,) int64
        self.last_ended_document: Tensor | None = None  # (B,) bool

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return -1 if self.last_doc_start is None else self.last_doc_start.shape[0]

    def memory(self, layer_idx: int, name: str, window: int | None = None) -> MemoryCache:
        """The cache of memory ``name`` in layer ``layer_idx`` (created empty on first use)."""
        memories = self.layers[layer_idx].memories
        if name not in memories:
            memories[name] = MemoryCache(window=window)
        return memories[name]

    def advance(self, num_tokens: int, last_doc_start: Tensor, last_ended_document: Tensor) -> None:
        """Record that ``num_tokens`` more positions went through every layer."""
        self.seen_tokens += num_tokens
        self.last_doc_start = last_doc_start
        self.last_ended_document = last_ended_document

    def _map_clock(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.last_doc_start is not None:
            self.last_doc_start = fn(self.last_doc_start)
            self.last_ended_document = fn(self.last_ended_document)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.last_doc_start = None
        self.last_ended_document = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_clock(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_clock(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_clock(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("MosaicCache cannot be cropped: key recurrences cannot be rewound")
