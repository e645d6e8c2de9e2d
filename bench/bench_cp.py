"""Context parallelism: how the FWL state crosses rank boundaries, state vs key/value exchange, over T.

Spawns `--cp` gloo processes (one thread each) and measures, for each sequence length T:

1. The FWL block alone, split over the cp ranks (each holds T/cp tokens of a sequence with one document
   running through every rank), forward + backward, in both exchanges:
   * bytes each rank receives in the exchange's collectives, forward + backward (counted at the
     torch.distributed calls: an all-gather of n-byte pieces delivers (cp-1)·n to every rank, a
     reduce-scatter of the gradients as much again), next to the analytic bytes per rank of docs/design.md §1.5
     (state: the six running sums, fp32; kv: T/cp·(d + 8s + 3s) activations);
   * step time (the slowest rank; best of --reps after a warm-up);
   * which one `auto` picks (model/fwl/context_parallel.py, choose_exchange).
   The crossover: the state costs dk·dv per boundary whatever T is; keys and values grow with T/cp.
2. The whole model (body + FWL), forward + backward: memory per rank — bytes autograd saves for backward
   (a saved-tensor hook; exact and device-independent) — for the unsplit model and each exchange. The
   attention here is document-masked (the loader always gives document ids), i.e. torch's math path that
   keeps the [T_rank, T] probabilities; the last rank attends to every earlier key, so the fullest rank
   saves about half the unsplit model's score memory, not 1/cp (a ring or a flash kernel with document
   masks would remove the quadratic term).

Run: python bench/bench_cp.py [--cp 2] [--width 64] [--lengths 64,128,...] (CPU; activations fp32 here,
so the analytic crossover printed uses 4-byte activations; with bf16 on GPUs it doubles).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from saved_bytes import SavedBytes  # bench/ is on sys.path when run as a script
import torch.distributed as dist

import fwl_scale.parallel.context_parallel as context
from fwl_scale.config import FWLConfig, load_config
from fwl_scale.model import build_model
from fwl_scale.model.fwl import FastWeightLayer
from fwl_scale.model.fwl.context_parallel import choose_exchange, fwl_exchange_bytes
from fwl_scale.parallel.context_parallel import CPContext
from fwl_scale.parallel.spawned import exit_spawned_rank


class CommCounter:
    """Bytes this rank receives in the collectives of parallel/context_parallel.py (patched in place)."""

    def __init__(self):
        self.bytes = 0
        self._all_gather = dist.all_gather
        self._reduce_scatter = context._reduce_scatter_single
        self._broadcast = dist.broadcast

    def __enter__(self):
        def all_gather(out, t, group=None, **kw):
            self.bytes += t.numel() * t.element_size() * (len(out) - 1)
            return self._all_gather(out, t, group=group, **kw)

        def reduce_scatter(out, t, group=None, **kw):
            n = dist.get_world_size(group)
            self.bytes += out.numel() * out.element_size() * (n - 1)
            return self._reduce_scatter(out, t, group=group, **kw)

        def broadcast(t, src, group=None, **kw):
            if dist.get_rank() != src:
                self.bytes += t.numel() * t.element_size()
            return self._broadcast(t, src, group=group, **kw)

        dist.all_gather, context._reduce_scatter_single, dist.broadcast = all_gather, reduce_scatter, broadcast
        return self

    def __exit__(self, *exc):
        dist.all_gather, context._reduce_scatter_single, dist.broadcast = (self._all_gather, self._reduce_scatter,
                                                                           self._broadcast)


DEVICE = {"device": torch.device("cpu")}  # this rank's device, set by worker (cuda under NCCL)


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=DEVICE["device"])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def fwl_step(layer, x, U, labels, docs) -> None:
    u, _ = layer(x, U, labels, docs)
    u.square().mean().backward()


def bench_fwl(rank: int, cp: CPContext, args, T: int) -> dict[str, object]:
    d, V = args.width, args.vocab
    torch.manual_seed(0)
    dev = DEVICE["device"]
    fwl = FWLConfig(width=d, grad_scale=1.0 / T, init_std=0.02, chunk_size=args.chunk, vocab_chunk=1024, form="auto")
    layer = FastWeightLayer(fwl, d, V, V, cp=cp).to(dev)
    U = torch.nn.Parameter((torch.randn(V, d) * 0.02).to(dev))
    g = torch.Generator().manual_seed(1)
    x_full = torch.randn(1, T, d, generator=g).to(dev)
    labels = torch.randint(0, V, (1, T), generator=g).to(dev)
    docs = torch.zeros(1, T, dtype=torch.long, device=dev)
    T_loc = T // cp.size
    x = x_full[:, rank * T_loc:(rank + 1) * T_loc].clone().requires_grad_()
    row: dict[str, object] = {"auto": choose_exchange("auto", d, d, 4 * d, T_loc, activation_bytes=4)}
    for exchange in ("state", "kv"):
        cp.exchange = exchange
        with CommCounter() as counter:
            fwl_step(layer, x, U, labels, docs)  # warm-up, and the bytes of one step
        times = []
        for _ in range(args.reps):
            dist.barrier()
            t0 = time.perf_counter()
            fwl_step(layer, x, U, labels, docs)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row[exchange] = (counter.bytes, slowest(min(times)))
    return row


def model_saved_bytes(args, T: int, cp: CPContext | None) -> int:
    cfg = load_config(None, [f"model.d_model={args.width}", "model.n_heads=4", "model.n_layers=2",
                             f"model.seq_len={T}", f"model.vocab_size={args.vocab}",
                             f"model.fwl.chunk_size={args.chunk}", "model.fwl.form=auto"])
    torch.manual_seed(0)
    model = build_model(cfg.model, parallel=cp).to(DEVICE["device"])
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (1, T), generator=g).to(DEVICE["device"])
    saved = SavedBytes()
    docs = torch.zeros_like(ids)  # document ids given, as the loader always does: document-masked attention
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        out = model(ids, ids.roll(-1, 1), docs)
    out.loss.backward()
    return saved.total


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if args.device == "cuda":
        DEVICE["device"] = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE["device"])
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    cp = CPContext(dist.group.WORLD, world, rank, "state")
    d, h = args.width, 4 * args.width
    lengths = [int(t) for t in args.lengths.split(",")]
    if rank == 0:
        b = fwl_exchange_bytes(d, d, h, 1, activation_bytes=4)
        cross = b["state"] / b["kv"]
        where = "NCCL ranks, one GPU each" if args.device == "cuda" else "gloo ranks (CPU, 1 thread each)"
        print(f"context parallelism over cp = {world} {where}, FWL d = s = {d}, "
              f"4s = {h}, V = {args.vocab}, fp32, chunk {args.chunk}, batch 1, one document across all ranks")
        print(f"analytic exchange per rank: state {b['state'] / 1024:.1f} KiB (fixed), kv {b['kv'] / 1024:.2f} KiB "
              f"per token -> crossover at T/cp ~ {cross:.0f} tokens (T ~ {cross * world:.0f}); with bf16 "
              f"activations T/cp ~ {2 * cross:.0f}")
        print("\n1. FWL block, forward + backward; bytes = received per rank in the exchange (fwd + bwd)")
        print(f"{'T':>6} {'T/cp':>6} {'state KiB':>10} {'kv KiB':>10} {'state ms':>9} {'kv ms':>9} "
              f"{'kv/state time':>13} {'auto':>6}")
    for T in lengths:
        row = bench_fwl(rank, cp, args, T)
        if rank == 0:
            (sb, st), (kb, kt) = row["state"], row["kv"]
            print(f"{T:>6} {T // world:>6} {sb / 1024:>10.1f} {kb / 1024:>10.1f} {st * 1e3:>9.2f} {kt * 1e3:>9.2f} "
                  f"{kt / st:>13.2f} {row['auto']:>6}", flush=True)

    if rank == 0:
        print("\n2. Whole model (2 layers + FWL, document-masked attention as in training), forward + backward: "
              "bytes saved for backward per rank (MiB; the fullest rank)")
        print(f"{'T':>6} {'unsplit':>9} {'cp state':>9} {'cp kv':>9} {'state/unsplit':>13}")

    for T in lengths:
        unsplit = model_saved_bytes(args, T, None) if rank == 0 else 0
        per = {}
        for exchange in ("state", "kv"):
            per[exchange] = model_saved_bytes(args, T, CPContext(dist.group.WORLD, world, rank, exchange))
        t = torch.tensor([per["state"], per["kv"]], dtype=torch.float64, device=DEVICE["device"])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the fullest rank
        if rank == 0:
            s, k = t.tolist()
            print(f"{T:>6} {unsplit / 2**20:>9.2f} {s / 2**20:>9.2f} {k / 2**20:>9.2f} {s / unsplit:>13.2f}",
                  flush=True)
    dist.destroy_process_group()
    exit_spawned_rank()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--width", type=int, default=64, help="d = s")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--lengths", default="32,64,128,256,512,1024,2048,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per rank over NCCL")
    args = ap.parse_args()
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(args.cp, port, args), nprocs=args.cp, start_method="spawn")


if __name__ == "__main__":
    main()
