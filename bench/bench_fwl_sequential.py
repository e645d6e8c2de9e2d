"""FWL operator: sequential fast-weight updates (model.fwl.update=sequential, docs/design.md §1.6) against the
parallel FWL, measured in one run.

The whole FastWeightLayer (slow pass, hand-written slow backward, fast pass) runs forward + backward on the same
inputs with update=parallel and with update=sequential for each inner chunk b. Printed per setting: the time,
its ratio to the parallel FWL, the bytes saved for backward (an autograd saved-tensor hook; exact) and, on
CUDA, the peak allocated. Run: python bench/bench_fwl_sequential.py [--width 256] [--length 2048] [--inner 16,64]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from bench_fwl_op import run  # bench/ is on sys.path when run as a script

from fwl_scale.config import FWLConfig
from fwl_scale.model.fwl import FastWeightLayer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256, help="d = s")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256, help="model.fwl.chunk_size (form auto)")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--inner", default="16,64", help="inner chunks b of the sequential update")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    d, T = args.width, args.length
    fwl = FWLConfig(width=d, grad_scale=1e-3, init_std=0.02, chunk_size=args.chunk, vocab_chunk=2048)
    layer = FastWeightLayer(fwl, d, args.vocab, args.vocab, device=device).to(dtype)
    U = torch.nn.Parameter(torch.randn(args.vocab, d, device=device, dtype=dtype) * 0.02)
    x = torch.randn(args.batch, T, d, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.batch, T), device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"FWL operator, d = s = {d}, V = {args.vocab}, T = {T}, batch {args.batch}, fwd+bwd, {args.dtype}, {name}")
    cuda = device.type == "cuda"
    print(f"{'update':>16} {'s':>9} {'/parallel':>10} {'saved MB':>10}" + (f" {'peak MB':>9}" if cuda else ""))
    settings = [("parallel", None)] + [("sequential", int(b)) for b in args.inner.split(",")]
    base = None
    for update, b in settings:
        layer.cfg = dataclasses.replace(fwl, update=update, inner_chunk=b or fwl.inner_chunk)
        t, saved, peak = run(layer, x, U, labels, device, args.reps)
        base = base if base is not None else t
        label = update if b is None else f"{update} b={b}"
        line = f"{label:>16} {t:>9.3f} {t / base:>10.2f} {saved / 2**20:>10.1f}"
        print(line + (f" {peak / 2**20:>9.1f}" if cuda else ""), flush=True)


if __name__ == "__main__":
    main()
