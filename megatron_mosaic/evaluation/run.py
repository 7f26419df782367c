"""One task at several lengths on one loaded model: generate, encode, score, summarize."""

from __future__ import annotations

import time
from typing import Callable, Mapping, Optional, Sequence

from .model_runner import LoadedModel, encode_document, score_batch
from .scoring import PositionLoss, summarize
from .tasks import generate_documents, get_task
from .text_tasks import TextSource


def _unit_budget(loaded: LoadedModel, task: str, length: int, seed: int, source,
                 options: Mapping[str, object]) -> int:
    """Units per document so that documents come out near ``length`` tokens: the ids format is
    one token per unit; a text tokenizer's tokens-per-unit ratio is measured on one document."""
    if loaded.vocab.fmt == "ids":
        return length
    probe = next(generate_documents(task, loaded.vocab, length, 1, seed + 7919, source, **options))
    tokens = sum(len(loaded.encode(s.text)) for s in probe.segments)
    return max(8, int(length * probe.num_units / max(tokens, 1)))


def evaluate_length(loaded: LoadedModel, task: str, length: int, num_docs: int, seed: int,
                    source: Optional[TextSource], batch_size: int,
                    log: Callable[[str], None], options: Optional[Mapping[str, object]] = None) -> dict:
    """Accuracy tables (answer tasks) and the per-position loss at ``length`` tokens; ``options``
    go to the task's generator (recall's ``num_pairs`` / ``query_order``)."""
    spec = get_task(task)
    options = options or {}
    budget = _unit_budget(loaded, task, length, seed, source, options)
    docs = [encode_document(d, loaded.encode, length)
            for d in generate_documents(task, loaded.vocab, budget, num_docs, seed, source, **options)]
    positions = PositionLoss()
    answers = []
    start = time.perf_counter()
    for first in range(0, len(docs), batch_size):
        answers += score_batch(loaded, docs[first:first + batch_size], task, positions)
        done = min(first + batch_size, len(docs))
        tokens = sum(len(d.ids) for d in docs[:done])
        log(f"  {task} @ {length}: {done}/{len(docs)} documents, "
            f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s")
    out = {"length": length, "documents": len(docs), "tokens": sum(len(d.ids) for d in docs),
           "mean_document_tokens": sum(len(d.ids) for d in docs) / len(docs),
           "seconds": round(time.perf_counter() - start, 3),
           "per_position": positions.binned(),
           "mean_loss": sum(positions.sums) / max(sum(positions.counts), 1)}
    if spec.grouping:
        out["summary"] = summarize(answers, spec.grouping)
    return out


def evaluate_task(loaded: LoadedModel, task: str, lengths: Sequence[int], *, num_docs: int, seed: int,
                  text: Optional[Sequence[str]], batch_size: int, name: str,
                  log: Callable[[str], None] = print, options: Optional[Mapping[str, object]] = None) -> dict:
    """The results document tools/evaluate.py writes as JSON (``options``: see ``evaluate_length``)."""
    spec = get_task(task)
    if spec.needs_text and not text:
        raise ValueError(f"task {task} needs real text: pass --text CORPUS.jsonl")
    source = TextSource(text, loaded.vocab) if spec.needs_text else None
    train = loaded.train_seq_length
    results = {"name": name, "model": loaded.kind, "parameters": loaded.parameters, "task": task,
               "train_seq_length": train, "format": loaded.vocab.fmt, "num_symbols": loaded.vocab.num_symbols,
               "seed": seed, "lengths": []}
    for length in lengths:
        if train and length > train:
            log(f"  note: length {length} is {length / train:g}x the training length {train}; "
                f"scoring it anyway (degradation is what this measures)")
        results["lengths"].append(evaluate_length(loaded, task, length, num_docs, seed, source,
                                                  batch_size, log, options))
    return results
