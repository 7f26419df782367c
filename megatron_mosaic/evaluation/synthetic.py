"""Synthetic in-context tasks: multi-query associative recall and anonymous-label few-shot.

Both are drawn afresh per document (which keys pair with which values, which classes exist,
which symbol names a class), so nothing about them can be memorised in the weights: only
reading the context solves them. Each generator fills exactly ``length`` units.
"""

from __future__ import annotations

import random

from .documents import Document
from .vocab import SymbolVocab, VocabError


def max_recall_pairs(length: int, num_symbols: int) -> int:
    """The most key-value pairs a recall document of ``length`` units can hold: distinct keys,
    and room for the pairs plus at least one query."""
    return max(1, min(num_symbols, (length - 2) // 2))


QUERY_ORDERS = ("rounds", "random")


def recall_options(num_pairs: int | None, query_order: str = "rounds") -> dict:
    """``recall_document`` keyword arguments for the tools' --num-pairs / --query-order, the
    defaults left out (so a default run generates exactly what it did before these existed)."""
    options: dict = {} if num_pairs is None else {"num_pairs": num_pairs}
    if query_order != "rounds":
        options["query_order"] = query_order
    return options


def recall_document(rng: random.Random, vocab: SymbolVocab, length: int,
                    num_pairs: int | None = None, query_order: str = "rounds") -> Document:
    """``k1 v1 ... kn vn`` then queries ``k v`` of earlier keys; each query's ``v`` is an answer.

    Keys are distinct within a document; values are drawn with replacement (so a value cannot be
    inferred by elimination). With ``query_order="rounds"`` (the default) queries walk random
    permutations of the keys, which keeps distances long but lets "the value seen longest ago"
    guess right often; ``"random"`` draws each query's key uniformly, with repeats, so how long
    ago a key was seen says nothing about which is asked next. ``distance`` counts units from the
    key's previous occurrence (its pair or an earlier query) to the query key.

    ``num_pairs`` defaults to ``length // 4`` (clamped to what fits); given explicitly it must
    fit (1 to ``max_recall_pairs``), or VocabError says so.
    """
    if length < 4:
        raise VocabError(f"recall needs a length >= 4, got {length}")
    if query_order not in QUERY_ORDERS:
        raise VocabError(f"--query-order must be one of {', '.join(QUERY_ORDERS)}, got {query_order!r}")
    limit = max_recall_pairs(length, vocab.num_symbols)
    if num_pairs is not None and not 1 <= num_pairs <= limit:
        raise VocabError(f"--num-pairs must be in [1, {limit}] for recall documents of {length} units "
                         f"with {vocab.num_symbols} symbols, got {num_pairs}")
    n = min(num_pairs or max(1, length // 4), limit)
    keys = rng.sample(range(vocab.num_symbols), n)
    values = {k: rng.randrange(vocab.num_symbols) for k in keys}
    doc = Document("recall", meta={"pairs": n, "length": length})
    last_seen = {}
    for k in keys:
        last_seen[k] = doc.num_units
        doc.add([vocab.key(k), vocab.value(values[k])])
    order: list[int] = []
    query = 0
    while doc.num_units + 2 <= length:
        if query_order == "random":
            k = rng.choice(keys)
        else:
            if not order:
                order = rng.sample(keys, len(keys))
            k = order.pop()
        position = doc.num_units
        doc.add([vocab.key(k)])
        doc.add([vocab.value(values[k])], {"query": query, "distance": position - last_seen[k]})
        last_seen[k] = position
        query += 1
    doc.add([vocab.marker("sep")] * (length - doc.num_units))
    return doc


def fewshot_document(rng: random.Random, vocab: SymbolVocab, length: int, num_classes: int = 4,
                     features_per_class: int = 6, shown_features: int = 3) -> Document:
    """Examples ``f f f = L``: features sampled from the class's own feature symbols, then its label.

    Classes (disjoint feature sets) and their labels (value symbols) are drawn per document, so
    a label is anonymous until the context shows it. ``shot`` is how many earlier examples of
    the same class the document holds: accuracy at shot 0 is at chance by construction.
    """
    features_per_class = min(features_per_class, vocab.num_symbols // num_classes)
    if num_classes < 2 or features_per_class < shown_features or shown_features < 1:
        raise VocabError(f"fewshot needs >= 2 classes of >= {shown_features} features each; "
                         f"{vocab.num_symbols} symbols allow {vocab.num_symbols // max(num_classes, 1)}")
    example_units = shown_features + 2
    if length < example_units:
        raise VocabError(f"fewshot needs a length >= {example_units}, got {length}")
    pool = rng.sample(range(vocab.num_symbols), num_classes * features_per_class)
    classes = [pool[c * features_per_class:(c + 1) * features_per_class] for c in range(num_classes)]
    labels = rng.sample(range(vocab.num_symbols), num_classes)
    doc = Document("fewshot", meta={"classes": num_classes, "length": length})
    shots = [0] * num_classes
    example = 0
    while doc.num_units + example_units <= length:
        c = rng.randrange(num_classes)
        doc.add([vocab.key(f) for f in rng.sample(classes[c], shown_features)] + [vocab.marker("answer")])
        doc.add([vocab.value(labels[c])], {"shot": shots[c], "example": example, "classes": num_classes})
        shots[c] += 1
        example += 1
    doc.add([vocab.marker("sep")] * (length - doc.num_units))
    return doc
