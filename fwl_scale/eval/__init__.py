"""Evaluation: validation perplexity, loss by position bucket, whole long documents in windows (perplexity.py);
every method — plain, FWL state reset or carried, dynamic evaluation (dynamic.py) — on any documents (docs.py)
with breakdowns (breakdown.py) and cost (methods.py, docrun.py: `fwl eval --out`), documents over data-parallel
and the model over tensor-parallel ranks (ranks.py), compared (compare.py)."""
from fwl_scale.eval.perplexity import (EvalResult, LongDocResult, bucket_edges, evaluate_batches,
                                       evaluate_documents, format_eval, format_long_docs)

__all__ = ["EvalResult", "LongDocResult", "bucket_edges", "evaluate_batches", "evaluate_documents",
           "format_eval", "format_long_docs"]
