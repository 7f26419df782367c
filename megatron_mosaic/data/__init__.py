"""Data side of megatron_mosaic: corpus -> tokenizer -> Megatron indexed dataset -> batches.

- ``tokenizers``: one Tokenizer interface (SentencePiece, GPT-2 BPE, Hugging Face, NullTokenizer).
- ``corpus``: reading JSON-lines / text corpora with file:line provenance.
- ``sentences``: Punkt sentence splitting trained offline on the input.
- ``preprocess``: ``tools/preprocess_data.py`` (text -> ``.bin/.idx``): its CLI; ``encoder`` (one
  document -> token ids, in worker processes), ``indexed_writer`` (the atomic ``.bin/.idx`` pair)
  and ``preprocess_jobs`` (one pipeline, or ``--partitions`` of them merged in order).
- ``tokenizer_training``: ``tools/train_tokenizer.py`` (SentencePiece BPE/unigram).
- ``fetch``: ``tools/fetch_corpus.py`` (the Shakespeare default corpus).
- ``datasets``: train/valid/test ``GPTDataset``s from ``--data-path`` style arguments.
- ``loader``: resumable data-parallel micro-batch loading.
"""
