"""Our tasks as lm-evaluation-harness data, and a tokenizer for checkpoints trained on token ids.

The task definitions in ``lm_eval_tasks/`` read JSON lines of this shape (one row per document,
its last answer: the longest context, so the row tests reading the context, not a prior):

    {"context": "... k", "answer": "v", "choices": ["v", "w", ...], "label": 0, "task": "recall",
     "fields": {"query": 30, "distance": 61}}

``choices`` are the distinct answers of the whole document (for recall the queried values, for
few-shot the labels of the classes shown), so a multiple-choice row is scored among candidates
the context itself offers; ``label`` indexes the right one.

NullTokenizer checkpoints have no tokenizer to export (their text *is* the ids), so ``lm_eval
--model hf`` cannot load one from the exported directory. ``write_ids_tokenizer`` writes the
equivalent transformers tokenizer (``0`` .. ``N-1`` split on whitespace, EOD ``<eod>`` = N) to
pass as ``tokenizer=DIR`` next to ``pretrained=EXPORT``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from .documents import Document
from .vocab import MARKERS, VocabError

EOD_TOKEN = "<eod>"


@dataclass
class LmEvalRow:
    context: str
    answer: str
    choices: list[str]
    task: str
    fields: dict = field(default_factory=dict)

    @property
    def label(self) -> int:
        return self.choices.index(self.answer)

    def to_json(self) -> dict:  # the shape documents.write_documents writes
        return {"context": self.context, "answer": self.answer, "choices": self.choices,
                "label": self.label, "task": self.task, "fields": self.fields}


def lm_eval_row(doc: Document) -> Optional[LmEvalRow]:
    """The document's last answer with everything before it as context (None: no answer, or an
    answer at the very start, which no context precedes)."""
    answered = [i for i, s in enumerate(doc.segments) if s.answer is not None]
    if not answered or answered[-1] == 0:
        return None
    last = answered[-1]
    choices = sorted({doc.segments[i].text for i in answered})
    return LmEvalRow(context=" ".join(s.text for s in doc.segments[:last]), answer=doc.segments[last].text,
                     choices=choices, task=doc.task, fields=dict(doc.segments[last].answer))


def lm_eval_rows(documents: Iterable[Document]) -> Iterator[LmEvalRow]:
    for doc in documents:
        row = lm_eval_row(doc)
        if row is not None:
            yield row


def ids_tokenizer(vocab_size: int):
    """NullTokenizer as a transformers tokenizer: ``"12 7"`` <-> ``[12, 7]``, EOD = ``vocab_size``.
    A word that is not an id maps to the unknown marker (id 0), as in the ids layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 1:
        raise VocabError(f"--vocab-size must be >= 1, got {vocab_size}")
    vocab = {str(i): i for i in range(vocab_size)}
    vocab[EOD_TOKEN] = vocab_size
    backend = Tokenizer(models.WordLevel(vocab, unk_token=str(MARKERS["unk"][0])))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Padding with EOD: lm_eval pads generation prompts on the left with an attention mask,
    # which the Mosaic model honours (pads form their own document); no row holds an EOD.
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOD_TOKEN, pad_token=EOD_TOKEN,
                                   clean_up_tokenization_spaces=False)


def write_ids_tokenizer(vocab_size: int, output_dir: str) -> str:
    ids_tokenizer(vocab_size).save_pretrained(output_dir)
    return output_dir
