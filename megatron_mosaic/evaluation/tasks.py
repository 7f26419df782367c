"""The task registry: name -> generator, and seeded generation of a set of documents."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from .documents import Document
from .synthetic import fewshot_document, recall_document
from .text_tasks import TextSource, lm_document, multidoc_document
from .vocab import SymbolVocab, VocabError


@dataclass(frozen=True)
class Task:
    name: str
    needs_text: bool
    generate: Callable[..., Document]
    grouping: tuple[str, ...]  # the answer fields the scorer reports accuracy by
    description: str


TASKS = {
    "recall": Task("recall", False, recall_document, ("query", "distance"),
                   "multi-query associative recall: key-value pairs, then queries of earlier keys"),
    "fewshot": Task("fewshot", False, fewshot_document, ("shot",),
                    "few-shot classification with anonymous labels drawn per document"),
    "multidoc": Task("multidoc", True, multidoc_document, ("depth",),
                     "facts planted in real-text passages, questions at the end (RULER-style)"),
    "lm": Task("lm", True, lm_document, (),
               "in-context language modelling: loss per position on real text"),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise VocabError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def document_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """One generator per document: document i is the same whatever --num-docs is, and lengths
    do not share draws (a string seed is hashed deterministically by ``random``)."""
    return random.Random(f"{seed}/{task}/{length}/{index}")


def generate_documents(task: str, vocab: SymbolVocab, length: int, num_docs: int, seed: int,
                       source: Optional[TextSource] = None, **options) -> Iterator[Document]:
    """``num_docs`` documents of ``length`` units each (options go to the task's generator)."""
    spec = get_task(task)
    if num_docs < 1:
        raise VocabError(f"--num-docs must be >= 1, got {num_docs}")
    if length < 1:
        raise VocabError(f"--length must be >= 1, got {length}")
    if spec.needs_text and source is None:
        raise VocabError(f"task {task} needs real text: pass --text CORPUS.jsonl")
    extra = {"source": source} if spec.needs_text else {}
    for index in range(num_docs):
        yield spec.generate(document_rng(seed, task, length, index), vocab, length, **extra, **options)
