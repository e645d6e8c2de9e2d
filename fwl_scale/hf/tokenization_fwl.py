"""The transformers tokenizer of an exported fwl_scale model: fwl_scale's sentencepiece model as it is
(`AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`). No sentencepiece settings are
re-interpreted: text is encoded by sentencepiece itself (identity normalisation, byte fallback), so the
ids are those of fwl_scale's Tokenizer; the only addition is that the text `<|endoftext|>` becomes the
document-end token. No BOS is added. The model file's sha256 is recorded in tokenizer_config.json
(`fwl_tokenizer_sha256`) and checked at load: another model file under the name is refused.

Needs only sentencepiece (not fwl_scale).
"""
from __future__ import annotations

import hashlib
import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

EOD = "<|endoftext|>"
MODEL_FILE = "spm.model"


class FWLTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": MODEL_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, fwl_tokenizer_sha256: str | None = None, **kwargs):
        with open(vocab_file, "rb") as f:
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if fwl_tokenizer_sha256 is not None and digest != fwl_tokenizer_sha256:
            raise ValueError(f"{vocab_file}: sha256 {digest[:16]} differs from the {fwl_tokenizer_sha256[:16]} "
                             "recorded in tokenizer_config.json: not the tokenizer this model was trained with")
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(data)
        if self.sp.eos_id() < 0 or self.sp.id_to_piece(self.sp.eos_id()) != EOD:
            raise ValueError(f"{vocab_file}: its document-end (eos) piece is not {EOD}")
        self.vocab_file = vocab_file
        self.fwl_tokenizer_sha256 = digest
        kwargs.setdefault("eos_token", EOD)
        kwargs.setdefault("pad_token", EOD)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(fwl_tokenizer_sha256=digest, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            ids = [i for i in ids if i != self.sp.eos_id()]
        return self.sp.decode(ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + MODEL_FILE
        out = os.path.join(save_directory, name)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
