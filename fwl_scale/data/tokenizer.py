"""Sentencepiece tokenizers: training (BPE or unigram, byte fallback, a document-end token) and loading.

Settings chosen so that decode(encode(text)) == text for any text: identity normalisation (no NFKC, no
whitespace collapsing), byte fallback for characters outside the vocabulary, and the newline as a piece
of its own. The document-end token is sentencepiece's eos (`<|endoftext|>`); every document in a shard
ends with it. A tokenizer's checksum is the sha256 of its model file; shards record it and the loader
refuses shards made with another tokenizer.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from fwl_scale.atomic import atomic_write_bytes
from fwl_scale.data.common import DataError

EOS_PIECE = "<|endoftext|>"
# Sentencepiece skips training sentences longer than this (bytes); longer lines are cut at spaces.
MAX_SENTENCE_BYTES = 8192


class Tokenizer:
    """A loaded sentencepiece model."""

    def __init__(self, model_bytes: bytes, path: str | Path | None = None):
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
            raise DataError(f"{path or 'tokenizer'}: not a sentencepiece model ({e})") from None
        self.path = Path(path) if path is not None else None
        self.checksum = hashlib.sha256(model_bytes).hexdigest()
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise DataError(f"{path or 'tokenizer'}: the model has no document-end (eos) token; "
                            f"train one with `fwl data tokenizer`")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{p}: no such tokenizer model") from None
        except OSError as e:
            raise DataError(f"{p}: cannot read tokenizer ({e})") from None
        return cls(data, p)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size}, checksum={self.checksum[:12]})"


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Training sentences: the lines of each document (sentencepiece never merges across a newline
    anyway, since the newline is a piece of its own); over-long lines cut at a space."""
    for text in texts:
        for line in text.split("\n"):
            if not line:
                continue
            while len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                cut = line.rfind(" ", 0, MAX_SENTENCE_BYTES // 4)
                cut = cut if cut > 0 else MAX_SENTENCE_BYTES // 4
                yield line[:cut]
                line = line[cut:]
            if line:
                yield line


def train_tokenizer(texts: Iterable[str], out_path: str | Path, vocab_size: int, model_type: str = "bpe",
                    num_threads: int = 1, seed: int = 0, what: str = "model.vocab_size") -> Tokenizer:
    """Trains a sentencepiece model on `texts` and writes it atomically to `out_path`.

    `what` names the config field that set the vocabulary size, for the error if it does not fit."""
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"data.tokenizer_type: must be bpe or unigram, got {model_type!r}")
    # Byte fallback needs its 256 byte pieces plus the specials; anything smaller cannot work.
    if vocab_size < 300:
        raise DataError(f"{what}: {vocab_size} is too small for a byte-fallback tokenizer (needs >= 300)")
    model = io.BytesIO()
    n_sentences = 0

    def counted() -> Iterator[str]:
        nonlocal n_sentences
        for s in _sentences(texts):
            n_sentences += 1
            yield s

    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"], unk_id=0, bos_id=-1, eos_id=1, pad_id=-1, eos_piece=EOS_PIECE,
            character_coverage=0.9995, max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=20_000_000, shuffle_input_sentence=True,
            num_threads=max(1, num_threads), minloglevel=2)
    except RuntimeError as e:
        msg = str(e)
        if n_sentences == 0:
            raise DataError("tokenizer: no training text (the training documents are empty)") from None
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise DataError(f"{what}: {vocab_size} does not fit the training text: {msg.strip()}") from None
        raise DataError(f"tokenizer training failed: {msg.strip()}") from None
    data = model.getvalue()
    tok = Tokenizer(data)
    if tok.vocab_size != vocab_size:
        raise DataError(f"{what}: sentencepiece produced {tok.vocab_size} pieces, expected {vocab_size}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, data)
    tok.path = out_path
    return tok


def token_dtype(vocab_size: int) -> str:
    """Shard storage type: uint16 while every id fits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"
