"""Evaluation cost on long documents: the FWL (state reset per window, state carried) against dynamic
evaluation (Krause et al.) of the baseline and of the FWL itself, in one run on one device, with the FLOP
model's ratios (fwl_scale/eval/methods.py) beside the measured ones, and where each method's time goes.

    python bench/bench_eval_cost.py                                   # the tiny shape
    python bench/bench_eval_cost.py --shape 125m --seq 512 --windows 2   # the 125M shape, shorter windows

Random initialisation and random token ids: the cost does not depend on the weights or the text. Every
method scores the same documents; the times are the best of `--repeats` interleaved rounds (other work
on a shared machine only ever adds time); with one thread the CPU time of the process is what it would
take alone on a quiet core, and is what the ratios use. Dynamic evaluation: the RMS variant on all parameters (the
update the issue compares with), a step after every `--segments` tokens (the window: model.seq_len).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fwl_scale.config import load_config  # noqa: E402
from fwl_scale.eval.dynamic import DynamicEvaluator, DynamicSettings, mean_squared_gradients, windows  # noqa: E402
from fwl_scale.eval.methods import dynamic_flops_per_token, forward_flops_per_token  # noqa: E402
from fwl_scale.eval.perplexity import document_token_losses  # noqa: E402
from fwl_scale.model import build_model  # noqa: E402
from fwl_scale.model.fwl import layer as fwl_module  # noqa: E402
from fwl_scale.model.fwl import FastWeightLayer  # noqa: E402
from fwl_scale.model.fwl.sums import FastSums  # noqa: E402
from fwl_scale.model.gpt import GPT  # noqa: E402
from fwl_scale.model.vocab import VocabLoss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": ("configs/tiny.yaml", "configs/base_tiny.yaml"),
          "125m": ("configs/fwl_125m.yaml", "configs/base_125m.yaml")}


def timed(fn) -> tuple[float, float]:
    """(wall, CPU time of this process): with one thread and other work on the machine, the CPU time is
    what the method would take alone on a quiet core."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


PARTS = [("body", GPT, "body"), ("FWL slow pass (dense)", FastWeightLayer, "slow_pass"),
         ("FWL slow gradient (softmax over V, U^T p)", FastWeightLayer, "slow_gradients"),
         ("FWL sums: chunk totals", FastSums, "__init__"), ("FWL sums: fast pass reads", FastSums, "attend"),
         ("FWL sums: fast pass reads", FastSums, "cumsum"), ("FWL normaliser 1/n_i (normalize=mean)", fwl_module,
                                                             "count_normalisers"),
         ("final logits + loss", VocabLoss, "forward")]


def where_time_goes(fn) -> dict[str, float]:
    """CPU seconds inside each part of the forward (PARTS), the rest being the head's elementwise work."""
    spent: dict[str, float] = {}
    saved = []
    for label, cls, attr in PARTS:
        orig = getattr(cls, attr)
        saved.append((cls, attr, orig))

        def wrapped(*a, _orig=orig, _label=label, **k):
            t0 = time.process_time()
            try:
                return _orig(*a, **k)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.process_time() - t0
        setattr(cls, attr, wrapped)
    try:
        _, total = timed(fn)
    finally:
        for cls, attr, orig in saved:
            setattr(cls, attr, orig)
    spent["rest of the head (fast pass elementwise, state)"] = total - sum(spent.values())
    spent["total"] = total
    return spent


@torch.no_grad()
def body_time(model, docs, window: int) -> float:
    """The body alone over the same windows: what is left of a forward pass is the head's."""
    def run():
        for doc in docs:
            for ids, _ in windows(doc, window):
                model.body(ids, torch.zeros_like(ids))
    return timed(run)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--seq", type=int, default=None, help="model.seq_len (default: the config's)")
    ap.add_argument("--layers", type=int, default=None, help="model.n_layers (default: the config's)")
    ap.add_argument("--vocab", type=int, default=None, help="model.vocab_size (default: the config's)")
    ap.add_argument("--windows", type=int, default=8, help="windows of model.seq_len per document")
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--segments", default="full,64", help="dynamic evaluation segment lengths (full = the window)")
    ap.add_argument("--fwl-dynamic", action="store_true", help="also dynamic evaluation of the FWL model")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    over = [f"model.seq_len={args.seq}"] if args.seq else []
    over += [f"model.n_layers={args.layers}"] if args.layers else []
    over += [f"model.vocab_size={args.vocab}"] if args.vocab else []
    fwl_cfg, base_cfg = (load_config(str(REPO / c), over).model for c in SHAPES[args.shape])
    T, V = fwl_cfg.seq_len, fwl_cfg.vocab_size
    torch.manual_seed(0)
    fwl = build_model(fwl_cfg, device="cpu").eval()
    torch.manual_seed(0)
    base = build_model(base_cfg, device="cpu").eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, V, (args.windows * T + 1,), generator=g) for _ in range(args.docs)]
    tokens = sum(d.numel() - 1 for d in docs)

    segs = [T if s == "full" else int(s) for s in args.segments.split(",")]
    methods = {"plain": lambda: [document_token_losses(base, d, T) for d in docs],
               "fwl_reset": lambda: [document_token_losses(fwl, d, T) for d in docs],
               "fwl_carried": lambda: [document_token_losses(fwl, d, T, True) for d in docs]}
    flops = {"plain": forward_flops_per_token(base_cfg), "fwl_reset": forward_flops_per_token(fwl_cfg),
             "fwl_carried": forward_flops_per_token(fwl_cfg)}
    for kind, model, cfg in [("base", base, base_cfg)] + ([("fwl", fwl, fwl_cfg)] if args.fwl_dynamic else []):
        # RMS statistics from one window of each document: the update's cost, not its quality, is measured.
        ms = mean_squared_gradients(model, "all", [next(iter(windows(d, T))) for d in docs])
        for seg in segs:
            s = DynamicSettings("rms", lr=1e-4, decay=1e-2, segment=seg, params="all", window=T)
            ev = DynamicEvaluator(model, s, ms)
            name = f"dynamic_{kind}_{seg}"
            methods[name] = (lambda ev=ev: [ev.document(d) for d in docs])
            flops[name] = dynamic_flops_per_token(cfg, model, s)
    methods["body_base"] = lambda: body_time(base, docs, T)
    methods["body_fwl"] = lambda: body_time(fwl, docs, T)

    best = {k: float("inf") for k in methods}
    wall = dict(best)
    for _ in range(args.repeats):
        for k, fn in methods.items():
            w, c = timed(fn)
            best[k], wall[k] = min(best[k], c), min(wall[k], w)
    parts = where_time_goes(methods["fwl_carried"])
    threads = torch.get_num_threads()
    print(f"shape {args.shape}: d {fwl_cfg.d_model}, {fwl_cfg.n_layers} layers, V {V}, T {T}; {args.docs} "
          f"document(s) of {args.windows} windows ({tokens} tokens); {platform.processor() or platform.machine()}, "
          f"{threads} thread(s), load {os.getloadavg()[0]:.1f}; best of {args.repeats}; times below are CPU "
          f"seconds of the one thread (wall in brackets)")
    print(f"{'method':<22}{'CPU s':>9}{'(wall s)':>10}{'tokens/s':>11}{'MFLOP/token':>13}")
    for k in methods:
        if k.startswith("body"):
            continue
        print(f"{k:<22}{best[k]:9.3f}{wall[k]:10.3f}{tokens / best[k]:11.0f}{flops[k] / 1e6:13.2f}")
    print("fwl_carried, CPU seconds by part:")
    for label, sec in parts.items():
        print(f"  {label:<62}{sec:8.3f}  {100 * sec / parts['total']:5.1f}%")
    print(f"where the forward time goes: baseline body {best['body_base']:.3f}s of {best['plain']:.3f}s; "
          f"FWL body {best['body_fwl']:.3f}s of {best['fwl_carried']:.3f}s "
          f"(head {best['fwl_carried'] - best['body_fwl']:.3f}s)")
    rows = []
    for k in methods:
        if not k.startswith("dynamic"):
            continue
        for f in ("fwl_carried", "fwl_reset"):
            rows.append({"fwl": f, "dynamic": k, "time_ratio": best[f] / best[k], "flop_ratio": flops[f] / flops[k]})
            print(f"{f} / {k}: time {best[f] / best[k]:.3f}, FLOP model {flops[f] / flops[k]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "T": T, "V": V, "layers": fwl_cfg.n_layers,
                                               "tokens": tokens, "threads": threads, "cpu_s": best, "wall_s": wall,
                                               "fwl_carried_parts_cpu_s": parts,
                                               "flops_per_token": flops, "ratios": rows}, indent=1))


if __name__ == "__main__":
    main()
