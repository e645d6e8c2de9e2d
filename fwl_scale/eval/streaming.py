"""Loss by position far past the training length, streaming long documents with the FWL state carried.

docs/design.md §1.3: with a constant gradient scale k the FWL's running sums keep growing, so streaming a document
far past the training sequence length T feeds the fast pass updates larger than any seen in training.
`evaluate_stream_positions` measures it: whole documents in consecutive aligned windows of `window`
tokens (the body sees its window; positions restart at each window, as in training on consecutive
segments), the FWL state carried from window to window (or not), and reports

* the loss by document position, in `buckets` buckets per window, for the first `n_windows` windows;
* the size of the accumulated fast update relative to its slow weight at each window's end,
  η·k·‖S‖/‖W‖ for W1 and W2 (S the running sum of rank-one gradients, k the scale the next position
  applies: the constant, already in S, or 1/count with model.fwl.normalize=mean; S decayed with
  model.fwl.decay): what grows past T when nothing normalises or forgets.

Labels are known for every position (the next token of the document), so no position is pending; this is
the same carried-state computation as fwl_scale.eval.perplexity.evaluate_documents, at finer resolution.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from fwl_scale.atomic import atomic_write_json
from fwl_scale.config import Config, load_config
from fwl_scale.data import eval_documents, prepare_data
from fwl_scale.device import resolve_device
from fwl_scale.eval.perplexity import bucket_edges
from fwl_scale.eval.run import load_for_eval


@dataclass
class StreamPositionResult:
    window: int
    carry_state: bool
    documents: int
    edges: list[tuple[int, int]]  # document positions [a, b) of each bucket
    loss: list[float]  # mean loss per bucket (nan: no tokens)
    tokens: list[int]
    update_w1: list[float] = field(default_factory=list)  # η_W1‖S1‖/‖W1‖ after window w (mean over documents)
    update_w2: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"window": self.window, "carry_state": self.carry_state, "documents": self.documents,
                "edges": [list(e) for e in self.edges], "loss": self.loss, "tokens": self.tokens,
                "update_w1": self.update_w1, "update_w2": self.update_w2}


@torch.no_grad()
def evaluate_stream_positions(model: torch.nn.Module, documents: Iterable[Tensor], window: int,
                              device: torch.device, n_windows: int, buckets: int = 4,
                              carry_state: bool = True) -> StreamPositionResult:
    """Documents shorter than n_windows·window + 1 tokens are skipped, so every bucket averages the same
    documents (a position effect, not a document mix effect)."""
    if window < 1 or n_windows < 1:
        raise ValueError(f"window ({window}) and n_windows ({n_windows}) must be >= 1")
    fwl = getattr(model, "fwl", None)
    inner = bucket_edges(window, buckets)
    edges = [(w * window + a, w * window + b) for w in range(n_windows) for a, b in inner]
    sums = torch.zeros(len(edges), dtype=torch.float64)
    counts = torch.zeros(len(edges), dtype=torch.float64)
    upd = torch.zeros(2, n_windows, dtype=torch.float64)
    n_docs = 0
    for doc in documents:
        doc = doc.to(device=device, dtype=torch.int64).flatten()
        if doc.numel() < n_windows * window + 1:
            continue
        n_docs += 1
        state = None
        for w in range(n_windows):
            ids = doc[w * window:(w + 1) * window][None]
            labels = doc[w * window + 1:(w + 1) * window + 1][None]
            kwargs = {"fwl_state": state, "return_state": True} if (carry_state and fwl is not None) else {}
            out = model(ids, labels, torch.zeros_like(ids), **kwargs)
            loss = out.token_loss[0].to(torch.float64).cpu()
            for i, (a, b) in enumerate(inner):
                sums[w * len(inner) + i] += loss[a:b].sum()
                counts[w * len(inner) + i] += b - a
            if fwl is not None and out.fwl_state is not None:
                state = out.fwl_state
                eta = fwl.step_sizes.detach().double() * fwl.update_scale(state)[0].double()
                upd[0, w] += float(eta[0].abs() * state.w1.double().norm() / fwl.w1.detach().double().norm())
                upd[1, w] += float(eta[2].abs() * state.w2.double().norm() / fwl.w2.detach().double().norm())
    if n_docs == 0:
        raise ValueError(f"no document has the {n_windows * window + 1} tokens needed for {n_windows} windows "
                         f"of {window}")
    loss = [float(s / c) if c > 0 else math.nan for s, c in zip(sums, counts)]
    has_updates = fwl is not None and carry_state
    return StreamPositionResult(window=window, carry_state=carry_state, documents=n_docs, edges=edges, loss=loss,
                                tokens=[int(c) for c in counts],
                                update_w1=(upd[0] / n_docs).tolist() if has_updates else [],
                                update_w2=(upd[1] / n_docs).tolist() if has_updates else [])


def format_stream_positions(results: list[tuple[str, StreamPositionResult]]) -> str:
    """One column per (name, result), one row per position bucket."""
    names = [n for n, _ in results]
    first = results[0][1]
    lines = [f"loss by document position, windows of {first.window} streamed with the FWL state carried where "
             f"stated ({first.documents} documents)",
             f"{'positions':>15} " + " ".join(f"{n:>14}" for n in names)]
    for i, (a, b) in enumerate(first.edges):
        lines.append(f"{a:>7}-{b - 1:<7} " + " ".join(f"{r.loss[i]:>14.4f}" for _, r in results))
    for name, r in results:
        if r.update_w1:
            lines.append(f"{name}: fast update / slow weight after each window, W1: "
                         + " ".join(f"{v:.3g}" for v in r.update_w1) + "; W2: "
                         + " ".join(f"{v:.3g}" for v in r.update_w2))
    return "\n".join(lines)


def stream_checkpoint(cfg: Config, checkpoint: str | Path, windows: int = 8, buckets: int = 4,
                      max_docs: int | None = None, json_out: str | Path | None = None) -> None:
    """`fwl eval CONFIG CKPT --stream`: the loss by position of the checkpoint's model on the first `max_docs`
    validation documents long enough for `windows` windows of model.seq_len, with and without the carried
    state (FWL), printed (and written to `json_out`)."""
    device = resolve_device(cfg)
    model, ref = load_for_eval(cfg, checkpoint, device)
    paths = prepare_data(cfg)
    T = cfg.model.seq_len
    modes = [True, False] if cfg.model.fwl.enabled else [False]
    results = []
    need = windows * T + 1
    for carry in modes:
        docs = itertools.islice((d for d in eval_documents(cfg, paths) if d.numel() >= need), max_docs)
        name = "state carried" if carry else "windows alone"
        results.append((name, evaluate_stream_positions(model, docs, T, device, windows, buckets, carry)))
    f = cfg.model.fwl
    scale = {"mean": "k = 1/n (normalize=mean)", "sqrt": "k = 1/√n (normalize=sqrt)"}.get(
        f.normalize, f"gradient scale k = {cfg.model.fwl_grad_scale:.3g}")
    head = getattr(model, "fwl", None)
    decays = "" if head is None or not head.decays() else ", λ " + " ".join(
        f"{n}={v:.4f}" for n, v in head.decays().items())
    print(f"checkpoint {ref.path} (step {ref.step}), {scale}{decays}")
    print(format_stream_positions(results))
    if json_out:
        atomic_write_json(json_out, {n: r.as_dict() for n, r in results})


def main(argv: list[str] | None = None) -> int:
    """python -m fwl_scale.eval.streaming CONFIG CHECKPOINT [--windows 8] [--docs 5] [overrides ...]: the
    spelling before `fwl eval CONFIG CHECKPOINT --stream [--windows 8] [--max-docs 5]`, kept until 0.2."""
    print("note: python -m fwl_scale.eval.streaming is deprecated and will be removed in the next release; "
          "use fwl eval CONFIG CHECKPOINT --stream (--docs N is --max-docs N there)", file=sys.stderr)
    ap = argparse.ArgumentParser(prog="python -m fwl_scale.eval.streaming", description=main.__doc__)
    ap.add_argument("config")
    ap.add_argument("checkpoint")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, key.sub=value")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--buckets", type=int, default=4, help="buckets per window")
    ap.add_argument("--docs", type=int, default=None,
                    help="the first this many validation documents that are long enough for --windows")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    stream_checkpoint(load_config(args.config, args.overrides), args.checkpoint, args.windows, args.buckets,
                      args.docs, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
