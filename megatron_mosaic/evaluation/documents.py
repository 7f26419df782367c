"""Evaluation documents: segments of units, some marked as answers, stored as JSON lines.

A document is a list of segments. ``text`` (what ``tools/preprocess_data.py`` reads) is the
segments' text joined by single spaces; every segment that is an answer carries a dict of what
the scorers group by (query index, key-to-query distance, shot index, depth). Evaluation
tokenizes segment by segment, so the answer tokens are known exactly under any tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional


class DocumentFormatError(ValueError):
    """A JSON line that is not an evaluation document (message: ``file:line: reason``)."""


@dataclass
class Segment:
    units: list[str]
    answer: Optional[dict] = None  # None: context; else the answer's grouping fields

    @property
    def text(self) -> str:
        return " ".join(self.units)


@dataclass
class Document:
    task: str
    segments: list[Segment] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def add(self, units: Iterable[str], answer: Optional[dict] = None) -> None:
        """Append units; context units join the previous context segment (fewer segments)."""
        units = list(units)
        if not units:
            return
        if answer is None and self.segments and self.segments[-1].answer is None:
            self.segments[-1].units.extend(units)
        else:
            self.segments.append(Segment(units, None if answer is None else dict(answer)))

    @property
    def num_units(self) -> int:
        return sum(len(s.units) for s in self.segments)

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)

    def answers(self) -> list[Segment]:
        return [s for s in self.segments if s.answer is not None]

    def to_json(self) -> dict:
        return {"text": self.text, "task": self.task, "meta": self.meta,
                "segments": [{"text": s.text, "answer": s.answer} for s in self.segments]}

    @staticmethod
    def from_json(obj: dict, where: str = "document") -> "Document":
        try:
            segments = [Segment(str(s["text"]).split(), s.get("answer")) for s in obj["segments"]]
            doc = Document(str(obj["task"]), segments, dict(obj.get("meta", {})))
        except (KeyError, TypeError, AttributeError) as err:
            raise DocumentFormatError(f"{where}: not an evaluation document (missing or bad {err})") from None
        if doc.text.split() != str(obj.get("text", "")).split():
            raise DocumentFormatError(f"{where}: 'text' does not equal its segments joined")
        return doc


def write_documents(path: str, documents: Iterable[Document]) -> int:
    """Write JSON lines atomically (a partial file is never left under ``path``); returns count."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.incomplete-{os.getpid()}"
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for doc in documents:
                f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def read_documents(path: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DocumentFormatError(f"{where}: {err.msg}") from None
            if not isinstance(obj, dict):
                raise DocumentFormatError(f"{where}: expected a JSON object")
            yield Document.from_json(obj, where)
