"""`fwl eval CONFIG CKPT --out DIR [--docs FILE...]`: every method (fwl_scale/eval/methods.py) on the same
documents, with breakdowns and cost, into DIR/results.json and DIR/report.md; the tokenized documents
and training token counts are cached in DIR/cache. Nothing is written under the run directory or the
training data root.

Dynamic evaluation's lr and decay, and the caches' w and δ or θ (fwl_scale/eval/cache.py), are chosen on
the first `tune_docs` validation documents (first `tune_tokens` tokens of each), which are then left out of
the evaluated documents when those are the validation documents too (with `leave_out_tune_docs`, also when
no method tunes: the documents scored do not depend on the methods); the RMS variant's mean squared
gradients come from the first `stat_segments` segments of the training shards (or of the tuning documents
when there are none).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from fwl_scale.atomic import atomic_write_json, atomic_write_text
from fwl_scale.config import Config
from fwl_scale.data import Manifest
from fwl_scale.data.shards import MANIFEST, read_shard
from fwl_scale.device import resolve_device, select_cuda_device
from fwl_scale.eval.breakdown import frequency_ranks
from fwl_scale.eval.cache import CacheEvaluator, CacheSettings, grid_points, tune_cache
from fwl_scale.eval.docs import checkpoint_tokenizer, load_documents, training_token_counts, validation_documents
from fwl_scale.eval.dynamic import DynamicEvaluator, DynamicSettings, mean_squared_gradients, tune, windows
from fwl_scale.eval.names import CACHE_METHODS, REPORT, RESULTS, TUNED_METHODS
from fwl_scale.eval.methods import check_methods, default_methods, run_method
from fwl_scale.eval.perplexity import perplexity_of
from fwl_scale.eval.ranks import eval_ranks
from fwl_scale.eval.run import load_for_eval


@dataclass
class DocEvalOptions:
    out: str
    docs: list[str] | None = None  # files; None: the checkpoint's validation documents
    max_docs: int | None = None
    max_tokens: int | None = None  # per document
    methods: list[str] | None = None
    dynamic_variant: str = "rms"
    dynamic_params: str = "all"
    dynamic_segment: int | None = None  # tokens per update (None: model.seq_len)
    lrs: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4])
    decays: list[float] = field(default_factory=lambda: [0.0, 1e-2])
    tune_docs: int = 1
    # Leave the tuning documents out of the scored validation documents even when no method tunes, so that
    # an evaluation without dynamic or a cache scores the documents one with them does (a study's two arms).
    leave_out_tune_docs: bool = False
    tune_tokens: int = 4096
    stat_segments: int = 32
    cache_weights: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3])  # w
    cache_decays: list[float] = field(default_factory=lambda: [0.99, 0.995, 0.999, 1.0])  # δ (unigram)
    cache_thetas: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])  # θ (continuous)
    cache_length: int = 2048  # L (continuous)
    progress: bool = True


def documents_id(documents: list[torch.Tensor], max_tokens: int | None) -> str:
    """What the methods read (the evaluated tokens of every document): runs compared must agree on it."""
    h = hashlib.sha256()
    for d in documents:
        part = d if max_tokens is None else d[:max_tokens + 1]
        h.update(part.cpu().numpy().astype("<i8").tobytes() + b"|")
    return h.hexdigest()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _training_segments(cfg: Config, segment: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    path = Path(cfg.data.root) / "train" / MANIFEST
    m = Manifest.load(path)
    for entry in m.shards:
        for doc in read_shard(m, entry, cfg.model.vocab_size):
            yield from windows(torch.from_numpy(doc.tokens.astype(np.int64)), segment)


def _first(it, n: int) -> list:
    out = []
    for x in it:
        if len(out) >= n:
            break
        out.append(x)
    return out


def run_document_eval(cfg: Config, checkpoint: str | Path, opts: DocEvalOptions, log=print) -> dict[str, Any]:
    where = eval_ranks(cfg)
    world = where.world
    say = log if where.leader else (lambda s: None)
    out = Path(opts.out)
    cache = out / "cache"
    device = resolve_device(cfg)
    if device.type == "cuda":
        device = select_cuda_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's checkpoint converter may be imported
    model, ref = load_for_eval(cfg, checkpoint, device, where.tp, where.stage)
    methods = list(opts.methods or default_methods(cfg.model))
    check_methods(methods, cfg.model)
    for method in (m for m in methods if m in CACHE_METHODS):  # bad grids refused before anything is written
        grid_points(CacheSettings(method, length=opts.cache_length), opts.cache_weights,
                    opts.cache_decays if method == "unigram_cache" else opts.cache_thetas)
    tok = checkpoint_tokenizer(cfg)
    # Rank 0 tokenizes and counts into the cache first; the others then read what it wrote.
    for turn in ((0,) if world == 1 else (0, 1)):
        if where.leader == (turn == 0):
            if opts.docs:
                documents, source = load_documents(opts.docs, tok, cache, cfg.data.text_field, say)
            else:
                documents, source = None, {"validation": str(Path(cfg.data.root) / "valid" / MANIFEST)}
            counts = training_token_counts(cfg, cache, say)
        _barrier()
    tuned_methods = [m for m in methods if m in TUNED_METHODS]
    need_valid = documents is None or bool(tuned_methods)
    valid = [d.to(device) for d in validation_documents(cfg, tok)] if need_valid else []
    n_tune = opts.tune_docs if tuned_methods else 0
    if tuned_methods and len(valid) < n_tune + (1 if documents is None else 0):
        raise ValueError(f"{' and '.join(tuned_methods)} tune on {n_tune} validation documents; the checkpoint's "
                         f"validation split has {len(valid)}")
    tune_docs = valid[:n_tune]
    if documents is None:
        documents = valid[opts.tune_docs if tuned_methods or opts.leave_out_tune_docs else 0:]
    documents = [d.to(device) for d in documents if d.numel() >= 2]
    if opts.max_docs is not None:
        documents = documents[:opts.max_docs]
    if not documents:
        raise ValueError("no documents with at least two tokens to evaluate")
    ranks = frequency_ranks(counts[0]) if counts is not None else None
    report: dict[str, Any] = {
        "checkpoint": str(ref.path), "step": ref.step, "model": cfg.name, "fwl": cfg.model.fwl.enabled,
        "seq_len": cfg.model.seq_len, "documents": len(documents), "max_tokens": opts.max_tokens,
        "documents_id": documents_id(documents, opts.max_tokens),
        "source": source, "tokenizer_checksum": tok.checksum, "world_size": world,
        "tensor_parallel": where.tp.size if where.tp is not None else 1,
        "pipeline_parallel": where.stage.size if where.stage is not None else 1,
        "frequency_counts": counts[1] if counts is not None else "none (no training shards): no frequency breakdown",
        "methods": [],
    }
    dyn = None
    if "dynamic" in methods:
        base = DynamicSettings(opts.dynamic_variant, segment=opts.dynamic_segment or cfg.model.seq_len,
                               params=opts.dynamic_params, window=cfg.model.seq_len)
        t0 = time.perf_counter()
        ms = None
        if base.variant == "rms":
            if (Path(cfg.data.root) / "train" / MANIFEST).is_file():
                segs = _first(_training_segments(cfg, base.segment), opts.stat_segments)
                stat_source = f"{len(segs)} training segments"
            else:
                segs = _first((s for d in tune_docs for s in windows(d, base.segment)), opts.stat_segments)
                stat_source = f"{len(segs)} tuning segments"
            ms = mean_squared_gradients(model, base.params, [(i.to(device), l.to(device)) for i, l in where.share(segs)],
                                        where.sum)
            say(f"dynamic evaluation: mean squared gradients over {stat_source}")
        tuned = tune(model, base, opts.lrs, opts.decays, where.share(tune_docs), ms, opts.tune_tokens, say, where.sum)
        dyn = DynamicEvaluator(model, tuned.settings, ms)
        report["dynamic_tuning"] = {"grid": tuned.grid, "chosen": tuned.settings.as_dict(),
                                    "tune_documents": len(tune_docs), "tune_tokens": opts.tune_tokens,
                                    "wall_s": time.perf_counter() - t0}
        say(f"dynamic evaluation: chose lr {tuned.settings.lr:g} decay {tuned.settings.decay:g}")
    caches: dict[str, CacheEvaluator] = {}
    for method in (m for m in methods if m in CACHE_METHODS):
        t0 = time.perf_counter()
        # On an FWL the cache sits on fwl_carried's distribution, on a baseline on plain's.
        ev = CacheEvaluator(model, CacheSettings(method, length=opts.cache_length), cfg.model.seq_len,
                            cfg.model.vocab_size, carry_state=cfg.model.fwl.enabled)
        second = opts.cache_decays if method == "unigram_cache" else opts.cache_thetas
        tuned_cache = tune_cache(ev, opts.cache_weights, second, where.share(tune_docs), opts.tune_tokens, say,
                                 where.sum)
        ev.settings = tuned_cache.settings
        caches[method] = ev
        report.setdefault("cache_tuning", {})[method] = {
            "grid": tuned_cache.grid, "chosen": tuned_cache.settings.as_dict(), "tune_documents": len(tune_docs),
            "tune_tokens": opts.tune_tokens, "wall_s": time.perf_counter() - t0}
        say(f"{method}: chose " + ", ".join(f"{k} {v:g}" for k, v in tuned_cache.settings.as_dict().items()
                                           if k != "method"))
    for method in methods:
        res = run_method(method, model, cfg.model, documents, ranks, opts.max_tokens, dyn, opts.progress, where,
                         caches)
        report["methods"].append(res.as_dict())
    if where.leader:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RESULTS, report)
        atomic_write_text(out / REPORT, format_report(report))
        say(format_report(report))
    return report


def dynamic_warnings(r: dict[str, Any]) -> list[str]:
    """Report lines for a dynamic evaluation to distrust: a loss that is not finite (it diverged on the
    scored documents), a learning rate chosen at the edge of its grid (the best may lie beyond)."""
    t, out = r["dynamic_tuning"], []
    lrs = sorted({g["lr"] for g in t["grid"]})
    chosen = t["chosen"]["lr"]
    if len(lrs) > 1 and chosen in (lrs[0], lrs[-1]):
        side = "largest" if chosen == lrs[-1] else "smallest"
        out += ["", f"Warning: the chosen lr {chosen:g} is the {side} of the grid {', '.join(f'{x:g}' for x in lrs)}: "
                    f"the best may lie beyond it (widen --dynamic-lr)."]
    diverged = [m["method"] for m in r["methods"] if m["method"] == "dynamic" and not math.isfinite(m["loss"])]
    if diverged:
        out += ["", f"Warning: dynamic evaluation diverged on the scored documents (loss not finite) with lr "
                    f"{chosen:g} chosen on the tuning documents: lower --dynamic-lr, or tune on documents of the "
                    f"scored kind (--tune-docs)."]
    return out


def format_report(r: dict[str, Any]) -> str:
    lines = [f"# {r['model']}: {r['checkpoint']} (step {r['step']})", "",
             f"{r['documents']} documents, windows of {r['seq_len']} tokens"
             + (f", first {r['max_tokens']} tokens of each" if r.get("max_tokens") else ""), "",
             "| method | loss | ppl | tokens | wall s | tokens/s | GFLOPs/token |", "|---|---|---|---|---|---|---|"]
    for m in r["methods"]:
        lines.append(f"| {m['method']} | {m['loss']:.4f} | {perplexity_of(m['loss']):.2f} | {m['tokens']} | "
                     f"{m['wall_s']:.2f} | {m['tokens_per_s'] or 0:,.0f} | {m['flops_per_token'] / 1e9:.4f} |")
    names = [m["method"] for m in r["methods"]]
    lines += ["", "Loss by document position (tokens):", "",
              "| positions | " + " | ".join(names) + " | tokens |", "|---" * (len(names) + 2) + "|"]
    for i, b in enumerate(r["methods"][0]["by_position"]):
        lines.append(f"| {b['start']}-{b['end'] - 1} | " + " | ".join(
            f"{m['by_position'][i]['loss']:.4f}" for m in r["methods"]) + f" | {b['tokens']} |")
    for axis, label in (("by_frequency", "training-frequency rank"), ("by_repetition", "repetition")):
        rows = r["methods"][0][axis]
        if not rows:
            continue
        lines += ["", f"Loss by {label}:", "", f"| {label} | " + " | ".join(names) + " | tokens |",
                  "|---" * (len(names) + 2) + "|"]
        for i, b in enumerate(rows):
            key = f"{b['ranks'][0]}-{b['ranks'][1]}" if "ranks" in b else b["name"]
            lines.append(f"| {key} | " + " | ".join(f"{m[axis][i]['loss']:.4f}" for m in r["methods"])
                         + f" | {b['tokens']} |")
    if "dynamic_tuning" in r:
        t = r["dynamic_tuning"]
        lines += ["", f"Dynamic evaluation: {t['chosen']['variant']} on {t['chosen']['params']} parameters, "
                      f"a step every {t['chosen']['segment']} tokens, chosen "
                      f"lr {t['chosen']['lr']:g} decay {t['chosen']['decay']:g} on {t['tune_documents']} validation "
                      f"documents ({t['wall_s']:.1f}s of tuning)"]
        lines += dynamic_warnings(r)
    for method, t in r.get("cache_tuning", {}).items():
        chosen = t["chosen"]
        what = (f"decay δ {chosen['decay']:g}" if method == "unigram_cache"
                else f"θ {chosen['theta']:g}, the last L = {chosen['length']} positions")
        lines += ["", f"{method}: on {'fwl_carried' if r['fwl'] else 'plain'}'s distribution, chosen weight w "
                      f"{chosen['weight']:g}, {what} on {t['tune_documents']} validation documents "
                      f"({t['wall_s']:.1f}s of tuning)"]
    return "\n".join(lines) + "\n"
