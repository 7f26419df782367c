"""A SentencePiece ``.model`` as a transformers tokenizer, encoding exactly as training did.

Training tokenizes with ``SentencePieceProcessor.encode_as_ids(text)`` (megatron-core's wrapper,
non-legacy) and never adds BOS/EOS; this class does the same, so ids match token for token.
Copied into exported model directories: imports only sentencepiece and transformers.
"""

from __future__ import annotations

import os
from shutil import copyfile

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class MemoryMosaicTokenizer(PreTrainedTokenizer):
    """SentencePiece tokenizer; ``eos_token`` is the EOD piece that separates documents."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, eos_token: str | None = None, unk_token: str | None = None,
                 pad_token: str | None = None, **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        if not self.sp_model.Load(vocab_file):
            raise ValueError(f"{vocab_file}: not a SentencePiece model")
        sp = self.sp_model
        eos_token = eos_token if eos_token is not None else (sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)
        unk_token = unk_token if unk_token is not None else (sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None)
        pad_token = pad_token if pad_token is not None else (sp.id_to_piece(sp.pad_id()) if sp.pad_id() >= 0 else None)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # A literal "</s>" in the text is ordinary characters to training's tokenizer: only the
        # data pipeline inserts EOD ids. Do not let the special-token splitter turn it into EOD.
        kwargs.setdefault("split_special_tokens", True)
        super().__init__(eos_token=eos_token, unk_token=unk_token, pad_token=pad_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        # Training data has no BOS and EOD only between documents: add nothing.
        return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary: {save_directory} is not a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            if os.path.isfile(self.vocab_file):
                copyfile(self.vocab_file, out)
            else:
                with open(out, "wb") as f:
                    f.write(self.sp_model.serialized_model_proto())
        return (out,)
