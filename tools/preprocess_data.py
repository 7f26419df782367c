#!/usr/bin/env python
"""Tokenize a corpus into Megatron's indexed binary format (.bin/.idx).

Same flags and output names as Megatron-LM's tools/preprocess_data.py, e.g.

    python tools/preprocess_data.py --input data/shakespeare/train.jsonl \
        --output-prefix data/shakespeare/train --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model data/shakespeare/tokenizer.model --append-eod --workers 2

writes data/shakespeare/train_text_document.bin/.idx. See --help for every flag.
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))
# megatron-core warns at import that CUDA-only extras are absent; irrelevant to preprocessing.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megatron_mosaic.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "tools/preprocess_data.py"))
