"""Tasks on real text: multi-document retrieval (RULER-style) and in-context language modelling.

The text comes from any corpus ``tools/preprocess_data.py`` reads (JSON lines with a ``text``
key, or ``.txt``), e.g. ``tools/fetch_corpus.py shakespeare``'s ``valid.jsonl``.
"""

from __future__ import annotations

import os
import random
from typing import Sequence

from megatron_mosaic.data.corpus import iter_texts

from .documents import Document
from .vocab import SymbolVocab, VocabError


class TextSource:
    """The works of a corpus as lists of units (words, or hashed word ids)."""

    def __init__(self, paths: Sequence[str], vocab: SymbolVocab):
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise VocabError(f"--text {missing[0]}: no such file")
        self.works = [units for units in (vocab.words(t) for t in iter_texts(list(paths))) if units]
        if not self.works:
            raise VocabError(f"--text {' '.join(paths)}: no text found")
        self.longest = max(len(w) for w in self.works)

    def window(self, rng: random.Random, size: int) -> list[str]:
        """``size`` consecutive units from a random place of a random work long enough."""
        candidates = [w for w in self.works if len(w) >= size]
        if not candidates:
            raise VocabError(f"--text: no work holds {size} units (the longest has {self.longest}); "
                             f"use a shorter length or a larger corpus")
        work = rng.choice(candidates)
        start = rng.randrange(len(work) - size + 1)
        return work[start:start + size]


def multidoc_document(rng: random.Random, vocab: SymbolVocab, length: int, source: TextSource,
                      passage_units: int | None = None, num_facts: int | None = None) -> Document:
    """Passages from random places of the corpus, ``# key value`` facts planted in some of them,
    then the questions ``? key value`` in random order (each value an answer).

    ``depth`` is the fact's position as a fraction of the context (0 = first unit), as in
    needle-in-a-haystack plots; ``length`` is the whole document's length in units.
    """
    # Defaults scale down for short documents: 32-unit passages and 4 facts from 128 units up.
    passage_units = passage_units or min(32, max(8, length // 8))
    num_facts = num_facts or max(1, min(4, length // 32))
    questions = 3 * num_facts
    context = length - questions
    if num_facts < 1 or context < 3 * num_facts + passage_units:
        raise VocabError(f"multidoc needs a length >= {6 * num_facts + passage_units} for {num_facts} "
                         f"facts and {passage_units}-unit passages, got {length}")
    text_units = context - 3 * num_facts
    passages = []
    while sum(len(p) for p in passages) < text_units:
        size = min(passage_units, text_units - sum(len(p) for p in passages))
        passages.append([vocab.marker("sep")] + source.window(rng, size - 1) if size > 1
                        else [vocab.marker("sep")])
    keys = rng.sample(range(vocab.num_symbols), num_facts)
    values = [rng.randrange(vocab.num_symbols) for _ in keys]
    hosts = rng.sample(range(len(passages)), num_facts) if num_facts <= len(passages) else \
        [rng.randrange(len(passages)) for _ in keys]
    for key, value, host in zip(keys, values, hosts):
        at = rng.randrange(1, len(passages[host]) + 1)  # never before the passage's separator
        passages[host][at:at] = [vocab.marker("fact"), vocab.key(key), vocab.value(value)]
    doc = Document("multidoc", meta={"facts": num_facts, "length": length, "passages": len(passages)})
    flat = [u for p in passages for u in p]
    doc.add(flat)
    depth = {}
    for i in range(len(flat) - 2):
        if flat[i] == vocab.marker("fact") and flat[i + 1] in {vocab.key(k) for k in keys}:
            depth[flat[i + 1]] = i / len(flat)
    for q in rng.sample(range(num_facts), num_facts):
        doc.add([vocab.marker("query"), vocab.key(keys[q])])
        doc.add([vocab.value(values[q])], {"depth": round(depth[vocab.key(keys[q])], 4),
                                           "length": length, "question": q})
    return doc


def lm_document(rng: random.Random, vocab: SymbolVocab, length: int, source: TextSource) -> Document:
    """A contiguous window of real text; the whole document is scored, per position."""
    doc = Document("lm", meta={"length": length})
    doc.add(source.window(rng, length))
    return doc
