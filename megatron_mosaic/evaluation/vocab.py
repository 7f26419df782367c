"""How task symbols become text: integer ids for ``NullTokenizer``, or words for any tokenizer.

Every generator writes *units*: one unit is one token under ``NullTokenizer`` (the ``ids``
format, where the text is whitespace-separated integers) and one word under a text tokenizer
(the ``text`` format). The ids layout of a vocabulary of N ids (EOD = N, as NullTokenizer has it):

    [0, 8)            markers (unknown word, separator, query, answer, fact)
    [8, 8+S)          key / feature symbols
    [8+S, 8+2S)       value / label symbols
    [8+2S, N)         real-text words, hashed

Keys and values are disjoint sets, so a value can never be mistaken for a key. Words of real
text (multi-document retrieval, in-context language modelling) are lower-cased and hashed
(CRC-32) into the word range: no word list has to be shipped or agree between training data
and evaluation data, at the cost of collisions between rare words.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

FORMATS = ("ids", "text")
NUM_RESERVED = 8
MAX_SYMBOLS = 256
# Marker name -> (id in the ids format, word in the text format).
MARKERS = {"unk": (0, "<unk>"), "sep": (1, "|"), "query": (2, "?"), "answer": (3, "="), "fact": (4, "#")}
_WORD = re.compile(r"\w+|[^\w\s]")


class VocabError(ValueError):
    """A vocabulary that cannot hold the task symbols (the message names the argument)."""


@dataclass(frozen=True)
class SymbolVocab:
    """Renders markers, key/value symbols and words as units of one format."""

    fmt: str = "ids"
    vocab_size: int | None = None  # ids format: NullTokenizer's --vocab-size N
    # Symbols per set. Text format: default 64. Ids format: at most a quarter of the non-reserved
    # ids (half of them are left to words), by default that many up to 256. Fewer symbols make
    # the tasks' embeddings faster to learn; training and evaluation must use the same number.
    num_symbols: int | None = None

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise VocabError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        limit = None
        if self.fmt == "ids":
            if self.vocab_size is None or self.vocab_size < NUM_RESERVED + 24:
                raise VocabError(f"--vocab-size must be >= {NUM_RESERVED + 24} for the ids format "
                                 f"(markers, two symbol sets and words), got {self.vocab_size}")
            limit = (self.vocab_size - NUM_RESERVED) // 4
        if self.num_symbols is None:
            object.__setattr__(self, "num_symbols", 64 if limit is None else min(MAX_SYMBOLS, limit))
        if self.num_symbols < 4 or (limit is not None and self.num_symbols > limit):
            raise VocabError(f"--num-symbols must be in [4, {limit or 'any'}]"
                             f"{f' for --vocab-size {self.vocab_size}' if limit else ''}, got {self.num_symbols}")

    @property
    def word_base(self) -> int:
        return NUM_RESERVED + 2 * self.num_symbols

    def marker(self, name: str) -> str:
        token_id, word = MARKERS[name]
        return str(token_id) if self.fmt == "ids" else word

    def key(self, index: int) -> str:
        self._check_symbol(index)
        return str(NUM_RESERVED + index) if self.fmt == "ids" else f"K{index}"

    def value(self, index: int) -> str:
        self._check_symbol(index)
        return str(NUM_RESERVED + self.num_symbols + index) if self.fmt == "ids" else f"V{index}"

    def _check_symbol(self, index: int) -> None:
        if not 0 <= index < self.num_symbols:
            raise VocabError(f"symbol {index} outside [0, {self.num_symbols})")

    def words(self, text: str) -> list[str]:
        """Units of real text: hashed word ids, or the words and punctuation themselves."""
        tokens = _WORD.findall(text)
        if self.fmt == "text":
            return tokens
        span = self.vocab_size - self.word_base
        return [str(self.word_base + zlib.crc32(t.lower().encode("utf-8")) % span) for t in tokens]
