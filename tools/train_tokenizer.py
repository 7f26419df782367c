#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE or unigram) on a raw corpus, e.g.

    python tools/train_tokenizer.py --input data/shakespeare/train.jsonl \
        --model-prefix data/shakespeare/tokenizer --vocab-size 8000 --model-type bpe

writes data/shakespeare/tokenizer.model/.vocab for --tokenizer-type SentencePieceTokenizer.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mosaic.data.tokenizer_training import main  # noqa: E402

if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "tools/train_tokenizer.py"))
