"""`fwl eval`: perplexity and loss by position, streaming past the training length, every method side by side
on any documents, and the comparison of such results.

    fwl eval CONFIG CKPT [key.sub=value ...] [--batches N] [--long-docs N] [--max-windows W] [--json FILE]
    fwl eval CONFIG CKPT [key.sub=value ...] --stream [--windows N] [--buckets B] [--max-docs N] [--json FILE]
    fwl eval CONFIG CKPT --out DIR [--docs FILE...] [--methods ...] [--dynamic rms|sgd] [--cache-weight ...] ...
    fwl eval --compare RESULT_DIR... --out DIR

Exit status: 0 done; 2 bad input (config, checkpoint, documents, options).
"""
from __future__ import annotations

import argparse

from fwl_scale.cli_support import leave_after_error, load_config_args, shutdown_process_group
from fwl_scale.config import ConfigError

# The commands import torch and the model inside their functions: `fwl` builds every parser at start, and
# `fwl --help` (or `fwl train`, before its stop handler) should not load them.


def _refuse_with(ns: argparse.Namespace, mode: str, options: tuple[str, ...]) -> None:
    """An option of another mode given with `mode` is an error, not silently ignored."""
    defaults = {"out": None, "docs": None, "batches": None, "long_docs": 0, "max_windows": None}
    given = [o for o in options if getattr(ns, o) != defaults[o]]
    if given:
        raise ConfigError(f"fwl eval {mode}: --{given[0].replace('_', '-')} belongs to another mode")


def _grid(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--{flag.replace('_', '-')} {text!r}: give comma-separated numbers") from None


def cmd_eval(ns: argparse.Namespace) -> int:
    if ns.compare:
        from fwl_scale.eval.compare import compare_runs  # heavy (matplotlib): see the note above

        if ns.out is None:
            raise ConfigError("--compare: give --out DIR for the table, the JSON and the plots")
        if ns.config is not None:
            raise ConfigError(f"--compare takes results directories only, not {ns.config!r} before it")
        compare_runs(ns.compare, ns.out)
        return 0
    if ns.config is None or ns.checkpoint is None:
        raise ConfigError("fwl eval: give CONFIG and CHECKPOINT (or --compare RESULT_DIR ...)")
    cfg = load_config_args([ns.config] + ns.overrides, need_config=True)
    if ns.stream:
        _refuse_with(ns, "--stream", ("out", "docs", "batches", "long_docs", "max_windows"))
        from fwl_scale.eval.streaming import stream_checkpoint  # heavy: see the note above

        stream_checkpoint(cfg, ns.checkpoint, ns.windows, ns.buckets, ns.max_docs, ns.json)
        return 0
    if ns.out is None:
        if ns.docs:
            raise ConfigError("--docs: give --out DIR for the results (and the tokenized documents' cache)")
        from fwl_scale.eval.run import run_eval  # heavy: see the note above

        run_eval(cfg, ns.checkpoint, batches=ns.batches, long_docs=ns.long_docs, max_windows=ns.max_windows,
                 json_out=ns.json)
        return 0
    from fwl_scale.eval.docrun import DocEvalOptions, run_document_eval  # heavy: see the note above
    from fwl_scale.eval.ranks import start_process_group  # (torch)

    opts = DocEvalOptions(out=ns.out, docs=ns.docs, max_docs=ns.max_docs, max_tokens=ns.max_tokens,
                          methods=ns.methods.split(",") if ns.methods else None, dynamic_variant=ns.dynamic,
                          dynamic_params=ns.dynamic_params, dynamic_segment=ns.dynamic_segment,
                          tune_docs=ns.tune_docs, leave_out_tune_docs=ns.leave_out_tune_docs,
                          tune_tokens=ns.tune_tokens,
                          stat_segments=ns.stat_segments)
    if ns.dynamic_lr:
        opts.lrs = [float(x) for x in ns.dynamic_lr.split(",")]
    if ns.dynamic_decay:
        opts.decays = [float(x) for x in ns.dynamic_decay.split(",")]
    for flag, name in (("cache_weight", "cache_weights"), ("cache_decay", "cache_decays"),
                       ("cache_theta", "cache_thetas")):
        if getattr(ns, flag):
            setattr(opts, name, _grid(getattr(ns, flag), flag))
    opts.cache_length = ns.cache_length
    start_process_group()
    try:
        run_document_eval(cfg, ns.checkpoint, opts)
    except (ValueError, ConfigError) as e:  # bad options or documents found once the checkpoint and data are read
        leave_after_error(e if isinstance(e, ConfigError) else ConfigError(str(e)))
    finally:
        shutdown_process_group()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="perplexity, loss by position, FWL vs dynamic evaluation on any documents",
                       description="Without --out: validation perplexity and loss by position (and --long-docs). "
                                   "--stream: the loss by position of whole validation documents streamed over "
                                   "--windows windows of model.seq_len, with the FWL state carried and reset. "
                                   "With --out DIR: every method (plain / slow_head, fwl_reset, fwl_carried, "
                                   "dynamic; unigram_cache and continuous_cache by --methods) on the same "
                                   "documents (--docs FILE..., else the validation split), "
                                   "with breakdowns by position, training frequency and repetition, and cost. "
                                   "--compare RESULT_DIR...: one table, JSON and plots of such results.")
    e.add_argument("config", nargs="?")
    e.add_argument("checkpoint", nargs="?", help="a run dir, its checkpoints/ dir or a step_* dir")
    e.add_argument("overrides", nargs="*", metavar="key.sub=value")
    e.add_argument("--batches", type=int, default=None, help="validation batches (default train.eval_batches)")
    e.add_argument("--long-docs", type=int, default=0, metavar="N",
                   help="also evaluate N whole validation documents in consecutive windows of model.seq_len")
    e.add_argument("--max-windows", type=int, default=None, help="windows per document at most")
    e.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    e.add_argument("--stream", action="store_true",
                   help="loss by position streaming whole validation documents past model.seq_len")
    e.add_argument("--windows", type=int, default=8, metavar="N",
                   help="--stream: windows of model.seq_len per document (shorter documents are skipped)")
    e.add_argument("--buckets", type=int, default=4, metavar="B", help="--stream: position buckets per window")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="results directory of the method comparison (results.json, report.md, cache/)")
    e.add_argument("--docs", nargs="+", default=None, metavar="FILE",
                   help="documents to evaluate: .txt/.md (one document), .jsonl[.xz/.gz/.bz2], .parquet")
    e.add_argument("--max-docs", type=int, default=None, help="evaluate at most this many documents")
    e.add_argument("--max-tokens", type=int, default=None, help="the first N predicted tokens of each document")
    e.add_argument("--methods", default=None,
                   help="comma-separated methods (default: plain,dynamic for a baseline, slow_head,fwl_reset,"
                        "fwl_carried,dynamic for an FWL; unigram_cache and continuous_cache run on either)")
    e.add_argument("--dynamic", default="rms", choices=["rms", "sgd"], help="dynamic evaluation variant")
    e.add_argument("--dynamic-params", default="all", choices=["all", "head", "last"],
                   help="parameters dynamic evaluation updates")
    e.add_argument("--dynamic-segment", type=int, default=None, metavar="N",
                   help="dynamic evaluation steps after every N tokens (default model.seq_len; shorter segments "
                        "see their window's earlier tokens through a key/value cache)")
    e.add_argument("--dynamic-lr", default=None, help="comma-separated learning-rate grid")
    e.add_argument("--dynamic-decay", default=None, help="comma-separated decay grid")
    e.add_argument("--cache-weight", default=None, metavar="W,...",
                   help="the caches' interpolation weight grid (default 0.05,0.1,0.2,0.3)")
    e.add_argument("--cache-decay", default=None, metavar="D,...",
                   help="unigram_cache: the counts' decay per token grid (default 0.99,0.995,0.999,1)")
    e.add_argument("--cache-theta", default=None, metavar="T,...",
                   help="continuous_cache: the flatness θ grid (default 0.1,0.3,1)")
    e.add_argument("--cache-length", type=int, default=2048, metavar="L",
                   help="continuous_cache: the earlier positions of the document it holds (default 2048)")
    e.add_argument("--tune-docs", type=int, default=1,
                   help="validation documents to choose dynamic evaluation's and the caches' parameters on")
    e.add_argument("--leave-out-tune-docs", action="store_true",
                   help="score the validation documents after the --tune-docs ones even when no method tunes: "
                        "the documents an evaluation with dynamic or a cache scores")
    e.add_argument("--tune-tokens", type=int, default=4096, help="tokens of each tuning document")
    e.add_argument("--stat-segments", type=int, default=32,
                   help="training segments for the rms variant's mean squared gradients")
    e.add_argument("--compare", nargs="+", default=None, metavar="RESULT_DIR",
                   help="compare the results directories (of --out runs) into --out")
    e.set_defaults(func=cmd_eval)
