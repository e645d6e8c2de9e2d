"""FWL operator: mixed-chunk vs quadratic form over sequence length, measured in one run.

For each T, the whole FastWeightLayer (slow pass, hand-written slow backward, fast pass) runs forward +
backward in both forms on the same inputs. Printed per T: time of each form, the ratio, and memory:
bytes saved for backward (an autograd saved-tensor hook; exact, device-independent) and, on CUDA, the
peak allocated. Run: python bench/bench_fwl_op.py [--width 256] [--lengths 512,1024,...]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from saved_bytes import SavedBytes  # bench/ is on sys.path when run as a script

from fwl_scale.config import FWLConfig
from fwl_scale.model.fwl import FastWeightLayer


def run(layer, x, U, labels, device, reps: int) -> tuple[float, int, int]:
    saved = SavedBytes()
    times = []
    peak = 0
    for rep in range(reps + 1):  # first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            u, _ = layer(x, U, labels)
        (u.float().square().mean()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        if rep:
            times.append(time.perf_counter() - t0)
    return min(times), saved.total, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256, help="d = s")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="of the layer and its activations (the running sums accumulate in fp32 either way)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    d = args.width
    fwl = FWLConfig(width=d, grad_scale=1e-3, init_std=0.02, chunk_size=args.chunk, vocab_chunk=2048)
    layer = FastWeightLayer(fwl, d, args.vocab, args.vocab, device=device).to(dtype)
    U = torch.nn.Parameter(torch.randn(args.vocab, d, device=device, dtype=dtype) * 0.02)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"FWL operator, d = s = {d}, V = {args.vocab}, chunk C = {args.chunk}, batch 1, fwd+bwd, {args.dtype}, {name}")
    print(f"analytic time crossover (W1 layer, C + 2dk.dv/(dk+dv)): T ~ {args.chunk + 2 * d * 4 * d / (5 * d):.0f}")
    print(f"{'T':>6} {'quad s':>9} {'chunk s':>9} {'quad/chunk':>10} {'quad saved MB':>14} {'chunk saved MB':>15}"
          + (f" {'quad peak MB':>13} {'chunk peak MB':>14}" if device.type == "cuda" else ""))
    for T in [int(t) for t in args.lengths.split(",")]:
        x = torch.randn(1, T, d, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, args.vocab, (1, T), device=device)
        row = {}
        for form in ("quadratic", "chunked"):
            layer.cfg = dataclasses.replace(fwl, form=form)
            row[form] = run(layer, x, U, labels, device, args.reps)
        (tq, mq, pq), (tc, mc, pc) = row["quadratic"], row["chunked"]
        line = f"{T:>6} {tq:>9.3f} {tc:>9.3f} {tq / tc:>10.2f} {mq / 2**20:>14.1f} {mc / 2**20:>15.1f}"
        if device.type == "cuda":
            line += f" {pq / 2**20:>13.1f} {pc / 2**20:>14.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
