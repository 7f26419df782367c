"""In-context evaluation tasks: seeded generators that write JSON-lines documents with answer
spans, and scorers (pure data and scoring: no training code, no torch).

- ``vocab``: units as NullTokenizer ids or as words for any tokenizer.
- ``documents``: segments with answer fields; JSON lines read/written.
- ``synthetic``: multi-query associative recall, few-shot classification with anonymous labels.
- ``text_tasks``: multi-document retrieval on real text, in-context language modelling.
- ``tasks``: the registry and seeded generation.
- ``scoring``: exact-match answers, grouped accuracies, per-position loss.
- ``model_runner`` / ``cp_runner``: forward passes on one process (HF model) or with the
  sequence split over a context-parallel group (the Megatron model).
- ``lm_eval_data`` (with ``lm_eval_tasks/``): the tasks as lm-evaluation-harness data.

``tools/make_eval_data.py`` writes the documents; ``tools/evaluate.py`` scores checkpoints.
"""

from .documents import Document, Segment, read_documents, write_documents
from .scoring import AnswerResult, PositionLoss, answer_correct, summarize
from .tasks import TASKS, generate_documents, get_task
from .text_tasks import TextSource
from .vocab import SymbolVocab, VocabError

__all__ = ["AnswerResult", "Document", "PositionLoss", "Segment", "SymbolVocab", "TASKS", "TextSource",
           "VocabError", "answer_correct", "generate_documents", "get_task", "read_documents", "summarize",
           "write_documents"]
