"""Evaluation: validation perplexity, loss by position bucket, whole long documents in windows (perplexity.py);
streaming whole documents past the training length (streaming.py); every method — plain, FWL state reset or
carried, dynamic evaluation (dynamic.py), the unigram and continuous caches (cache.py) — on any documents
(docs.py) with breakdowns (breakdown.py) and cost (methods.py, docrun.py: `fwl eval --out`), documents over
data-parallel and the model over tensor-parallel ranks (ranks.py), compared (compare.py); the command,
`fwl eval` (cli.py).

Nothing is imported here: `fwl` imports eval/cli.py to build its parser, which must not load torch."""
