"""Where each token sits: global position and the start of its document.

Every memory decision (what is visible, where recurrences reset, whether the value peek may look
at the next token, the adaptive-bandwidth count n_t) is a function of *global* positions and
document starts, so the same code serves a whole sequence on one device and a context-parallel
rank holding two non-adjacent chunks of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .masks import outside_autograd


@dataclass(frozen=True)
class SequenceLayout:
    """Global coordinates of the tokens a rank holds.

    positions:    (B, T) int64, global position of each token in the full packed sequence.
    doc_starts:   (B, T) int64, global position at which that token's document starts
                  (all zeros when there is one document per sequence / no document masking).
    total_length: number of tokens in the full, unsplit sequence.

    The per-batch facts the fast paths branch on (``single_document``, ``consecutive``,
    ``uniform_documents``) are Python values: given at construction where they are known
    without looking at the data (``contiguous``, ``from_tokens``' consecutive positions), else
    computed on first use with one host sync and cached, so the layers of a micro-batch share
    one sync instead of paying one each. The facts never change the math, only the path.
    Tensors derived from the layout alone (resets, visible counts, document masks) are built
    once per layout the same way (``derived``): once per micro-batch, not once per layer.
    """

    positions: Tensor
    doc_starts: Tensor
    total_length: int
    known_single_document: Optional[bool] = field(default=None, compare=False, repr=False)
    known_consecutive: Optional[bool] = field(default=None, compare=False, repr=False)
    known_uniform_documents: Optional[bool] = field(default=None, compare=False, repr=False)
    # Per-micro-batch derived objects the layers share (``derived``; FlexAttention block masks,
    # CP query tiles), keyed by their producer; never part of the layout's identity.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Shape/dtype checks only: value checks would force a device sync on every layer call.
        if self.positions.dim() != 2:
            raise ValueError(f"SequenceLayout.positions must be (B, T), got shape {tuple(self.positions.shape)}")
        if self.doc_starts.shape != self.positions.shape:
            raise ValueError(
                f"SequenceLayout.doc_starts shape {tuple(self.doc_starts.shape)} != positions shape "
                f"{tuple(self.positions.shape)}"
            )
        for name in ("positions", "doc_starts"):
            t = getattr(self, name)
            if t.dtype != torch.int64:
                raise TypeError(f"SequenceLayout.{name} must be int64, got {t.dtype}")
        if self.total_length < self.positions.shape[1]:
            raise ValueError(
                f"SequenceLayout.total_length={self.total_length} < number of tokens held "
                f"({self.positions.shape[1]})"
            )

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def seq_len(self) -> int:
        """Number of tokens held here (local T)."""
        return self.positions.shape[1]

    @staticmethod
    def contiguous(batch_size: int, seq_len: int, device: torch.device | str | None = None) -> "SequenceLayout":
        """One document per sequence, positions 0..seq_len-1."""
        positions = torch.arange(seq_len, dtype=torch.int64, device=device).expand(batch_size, seq_len)
        return SequenceLayout(positions.contiguous(), torch.zeros_like(positions), seq_len,
                              known_single_document=True, known_consecutive=True, known_uniform_documents=True)

    @staticmethod
    def from_tokens(tokens: Tensor, eod_token: int) -> "SequenceLayout":
        """Documents packed in (B, T) tokens, separated by ``eod_token``.

        The EOD token belongs to the document it ends; the token after it starts a new document.
        """
        if tokens.dim() != 2:
            raise ValueError(f"from_tokens: tokens must be (B, T), got shape {tuple(tokens.shape)}")
        batch_size, seq_len = tokens.shape
        positions = torch.arange(seq_len, dtype=torch.int64, device=tokens.device).expand(batch_size, seq_len)
        starts = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=tokens.device)
        starts[:, 0] = True
        starts[:, 1:] = tokens[:, :-1] == eod_token
        # A token's document start is the latest start at or before it: a running max.
        doc_starts = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
        return SequenceLayout(positions.contiguous(), doc_starts, seq_len, known_consecutive=True)

    def _fact(self, name: str, compute) -> bool:
        """A cached Python fact: the known value, else ``compute()`` once (one host sync)."""
        value = getattr(self, name)
        if value is None:
            value = bool(compute())
            object.__setattr__(self, name, value)  # frozen dataclass: cache, not a field change
        return value

    def derived(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()``, a function of this layout alone, built once per layout under ``key``
        (the layers of a micro-batch share its layout, so they share the result) as the shape
        constants are (``masks.outside_autograd``); while torch.compile traces, built inline
        (the graph's own values, no dict guards)."""
        if torch.compiler.is_compiling():
            return build()
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = outside_autograd(build)
        return value

    @property
    def resets(self) -> Tensor:
        """(B, T) bool: True where a document starts (recurrences reset, memories start empty)."""
        return self.derived(("resets",), lambda: self.positions == self.doc_starts)

    @property
    def single_document(self) -> bool:
        """True when no token here starts a document after global position 0 (fast paths).

        Implemented as "every token here belongs to the document starting at 0", which is the
        same thing for a whole sequence and the conservative answer for a context-parallel chunk.
        """
        return self._fact("known_single_document", lambda: not self.doc_starts.any())

    @property
    def consecutive(self) -> bool:
        """True when each row holds a run of consecutive global positions t0, t0+1, ..."""
        def compute() -> bool:
            p = self.positions
            if p.shape[1] == 0:
                return False
            offsets = torch.arange(p.shape[1], device=p.device)
            return bool((p == p[:, :1] + offsets).all())
        return self._fact("known_consecutive", compute)

    @property
    def uniform_documents(self) -> bool:
        """True when, in every row, all tokens held belong to one document (not necessarily
        the one starting at 0); implied by ``single_document``."""
        if self.known_single_document:
            return True
        return self._fact("known_uniform_documents",
                          lambda: (self.doc_starts == self.doc_starts[:, :1]).all())

    def to(self, device: torch.device | str) -> "SequenceLayout":
        """The same layout (facts included) on ``device``."""
        return SequenceLayout(self.positions.to(device), self.doc_starts.to(device), self.total_length,
                              self.known_single_document, self.known_consecutive, self.known_uniform_documents)

    def index_select(self, index: Tensor) -> "SequenceLayout":
        """The layout of the tokens at local indices ``index`` (1-D, along T); total_length kept."""
        if index.dim() != 1:
            raise ValueError(f"index_select: index must be 1-D, got shape {tuple(index.shape)}")
        index = index.to(self.positions.device)
        # A subset of a single-document / one-document row is one too; anything else is data.
        single = True if self.known_single_document else None
        uniform = True if self.known_single_document or self.known_uniform_documents else None
        return SequenceLayout(
            self.positions.index_select(1, index), self.doc_starts.index_select(1, index), self.total_length,
            known_single_document=single, known_uniform_documents=uniform,
        )
