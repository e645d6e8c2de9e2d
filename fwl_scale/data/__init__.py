"""The data pipeline: sentencepiece tokenizers, tokenized webdataset shards, the streaming loader.

    paths = prepare_data(cfg)                       # rank 0; idempotent
    loader = TrainLoader(cfg, paths, dp_rank, dp_size)
    batch = loader.next_batch()                     # input_ids, labels, doc_ids: int64 [micro, seq_len]
    sd = loader.state_dict(); loader.load_state_dict(sd)
    valid_batches(cfg, paths, max_batches, dp_rank, dp_size); eval_documents(cfg, paths)

The loader pulls in torch; it is imported on first use so that `fwl` and tokenizer workers start fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fwl_scale.data.common import DataError
from fwl_scale.data.prepare import DataPaths, ensure_tokenizer, prepare_data, tokenizer_from_paths
from fwl_scale.data.shards import Manifest
from fwl_scale.data.tokenizer import Tokenizer, train_tokenizer

if TYPE_CHECKING:
    from fwl_scale.data.loader import TrainLoader, eval_documents, valid_batches

_LOADER_NAMES = ("TrainLoader", "valid_batches", "eval_documents")

__all__ = ["DataError", "DataPaths", "Manifest", "Tokenizer", "TrainLoader", "ensure_tokenizer",
           "eval_documents", "prepare_data", "tokenizer_from_paths", "train_tokenizer", "valid_batches"]


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        from fwl_scale.data import loader  # on first use: the loader imports torch

        return getattr(loader, name)
    raise AttributeError(f"module 'fwl_scale.data' has no attribute {name!r}")
