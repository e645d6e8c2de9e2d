"""Evaluation: validation perplexity, loss by position bucket, whole long documents in windows."""
from fwl_scale.eval.perplexity import (EvalResult, LongDocResult, bucket_edges, evaluate_batches,
                                       evaluate_documents, format_eval, format_long_docs)

__all__ = ["EvalResult", "LongDocResult", "bucket_edges", "evaluate_batches", "evaluate_documents",
           "format_eval", "format_long_docs"]
