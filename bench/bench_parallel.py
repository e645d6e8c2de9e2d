"""The distributed engine on CPU: step time for tp=1 vs tp=2 and ZeRO-1 vs ZeRO-3, and the bytes each kind
of collective moves per step next to its analytic figure.

Spawns 2 gloo processes (one thread each) and trains the same small FWL model through the trainer's own
engine (`build_training_engine`, DeepSpeed, AdamW, clipping) in each layout, on the same global batch of
8 rows of T tokens per step (dp × micro_batch × grad_accum = 8):

    dp=2 ZeRO-1 (tp=1)   tp=2 ZeRO-1   tp=2+SP ZeRO-1   dp=2 ZeRO-3   pp=2 ZeRO-1

Step time: rank 0's wall time per optimizer step, mean of --steps steps after one warm-up step.

Bytes: every torch.distributed collective is wrapped before DeepSpeed or the model import it, and counts
the buffer it is handed — an all-reduce its tensor, an all-gather its output, a reduce-scatter its input,
a broadcast/send/recv its tensor — per step on rank 0 (what a ring moves over the wire is about
2(n-1)/n of that for an all-reduce and (n-1)/n for the others). The analytic figures (fp32, N = tokens of
one micro-batch, P = parameters, L layers, d = s width, step = grad_accum micro-batches):

* ZeRO-1, dp=2: gradients all-reduced once per step (P), updated parameters all-gathered (P).
* ZeRO-3, dp=2: parameters all-gathered once per micro-batch (P: they stay gathered from forward to
  backward while the model is below DeepSpeed's live-parameter and reuse-distance limits, 1e9 elements by
  default; a larger model is gathered again in backward, 2P), gradients reduce-scattered (P).
* tp=2 (Megatron, docs/design.md §3.2), per micro-batch, all-reduce: body N·d·(1 + 4L) (embedding; two per block
  forward, two backward) + FWL: forward the slow and fast W2 products and Uᵀgz (3·N·s) and the softmax
  statistics (3·N sums + 2·N maxima), backward the gradients of x, gh2, u and u' (N·d + 3·N·s), the
  sum-exp again (N), the step sizes (6), and the recomputed vocabulary chunks' forward (N·s + 3·N + 2·N).
* tp=2 + SP: the body's all-reduces become all-gathers (forward: N·d per column-parallel entry, 2 per
  block, + the FWL's input; backward the same from the row-parallel exits and the embedding) and
  reduce-scatters (the mirror image); the SP norms' and row biases' gradients add all-reduces of d each.
* pp=2: per micro-batch the activation goes forward (N·d floats + ids, labels, doc ids: 3·N int64) and
  its gradient comes back (N·d) — rank 0 (the first stage) sends the one and receives the other — and once
  per step the tied embedding's gradient is all-reduced between the two stages (V·d).

Collectives over a group of one rank (DeepSpeed reduces over its data-parallel group even when it has a
single member) move nothing and are not counted.

Run when the machine is otherwise idle: python bench/bench_parallel.py [--steps 3] [--d 128] [--layers 4]
[--seq 256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> which argument is the counted buffer (positional index, keyword), and how to size it
_COLLECTIVES = {
    "all_reduce": (0, "tensor", "one"),
    "all_gather": (0, "tensor_list", "list"),
    "all_gather_into_tensor": (0, "output_tensor", "one"),
    "all_gather_single": (0, "output_tensor", "one"),
    "reduce_scatter_single": (1, "input", "one"),
    "_all_gather_base": (0, "output_tensor", "one"),
    "reduce_scatter": (1, "input_list", "list"),
    "reduce_scatter_tensor": (1, "input", "one"),
    "_reduce_scatter_base": (1, "input", "one"),
    "broadcast": (0, "tensor", "one"),
    "reduce": (0, "tensor", "one"),
    "send": (0, "tensor", "one"),
    "recv": (0, "tensor", "one"),
    "isend": (0, "tensor", "one"),
    "irecv": (0, "tensor", "one"),
    "all_to_all_single": (1, "input", "one"),
}
COUNTS: dict[str, list[int]] = defaultdict(lambda: [0, 0])
COUNTING = {"on": False}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def install_counters() -> None:
    """Wraps torch.distributed's collectives in place. Must run before DeepSpeed and fwl_scale are
    imported: both keep references to some of these functions."""
    import torch.distributed as dist

    for name, (pos, key, kind) in _COLLECTIVES.items():
        orig = getattr(dist, name, None)
        if orig is None:
            continue

        def wrapper(*args, _orig=orig, _name=name, _pos=pos, _key=key, _kind=kind, **kwargs):
            group = kwargs.get("group")
            # A group of one moves nothing (DeepSpeed still "reduces" over a data-parallel group of 1).
            if COUNTING["on"] and not (group is not None and dist.get_world_size(group) == 1):
                buf = kwargs.get(_key, args[_pos] if len(args) > _pos else None)
                size = 0
                if buf is not None:
                    size = sum(_nbytes(t) for t in buf) if _kind == "list" else _nbytes(buf)
                op = kwargs.get("op", args[1] if _name == "all_reduce" and len(args) > 1 else None)
                base = {"all_gather_single": "all_gather_into_tensor", "_all_gather_base": "all_gather_into_tensor",
                        "reduce_scatter_single": "reduce_scatter_tensor",
                        "_reduce_scatter_base": "reduce_scatter_tensor"}.get(_name, _name)
                label = f"{base}(max)" if op is not None and "MAX" in str(op).upper() else base
                COUNTS[label][0] += 1
                COUNTS[label][1] += size
            return _orig(*args, **kwargs)

        setattr(dist, name, wrapper)


LAYOUTS = [
    ("dp=2 ZeRO-1", dict(zero=1), 4, 1),  # (name, layout, micro_batch, grad_accum)
    ("tp=2 ZeRO-1", dict(tp=2, zero=1), 4, 2),
    ("tp=2+SP ZeRO-1", dict(tp=2, sp=True, zero=1), 4, 2),
    ("dp=2 ZeRO-3", dict(zero=3), 4, 1),
    ("pp=2 ZeRO-1", dict(pp=2, zero=1), 4, 2),
]


def make_cfg(args, tp=1, pp=1, sp=False, zero=0, micro=4, gas=1, device="cpu"):
    from fwl_scale.config import load_config

    return load_config(None, [
        f"model.d_model={args.d}", f"model.n_heads={args.d // 32}", f"model.n_layers={args.layers}",
        f"model.seq_len={args.seq}", "model.vocab_size=4096", "model.fwl.vocab_chunk=1024",
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.sequence_parallel={str(sp).lower()}",
        f"parallel.zero_stage={zero}", f"parallel.micro_batch={micro}", f"parallel.grad_accum={gas}",
        "train.wandb.enabled=false", "train.steps=100", "train.warmup_steps=1", f"train.device={device}"])


def analytic(cfg, layout: dict, params: int) -> dict[str, float]:
    """Bytes per step by collective kind (see the module docstring)."""
    m, p = cfg.model, cfg.parallel
    N = p.micro_batch * m.seq_len
    d, s, L, gas = m.d_model, m.fwl_width, m.n_layers, p.grad_accum
    f = 4  # fp32
    out: dict[str, float] = {}
    if layout.get("zero") == 3 and layout.get("tp", 1) == 1 and layout.get("pp", 1) == 1:
        out["all_gather_into_tensor"] = gas * params * f
        out["reduce_scatter_tensor"] = gas * params * f
        return out
    if layout.get("tp", 1) == 1 and layout.get("pp", 1) == 1:
        out["all_reduce"] = params * f
        out["all_gather_into_tensor"] = params * f
        return out
    if layout.get("pp", 1) > 1:
        out["send"] = gas * (N * d * f + 3 * N * 8)
        out["recv"] = gas * N * d * f
        out["all_reduce"] = m.padded_vocab_size * d * f  # the tied embedding's gradient, between the stages
        return out
    # The softmax maxima are all-reduced with MAX (reported apart): forward and recomputation, 2 each.
    out["all_reduce(max)"] = gas * 4 * N * f
    fwl = (3 * N * s + 3 * N) + (N * d + 3 * N * s + N + 6) + (N * s + 3 * N)
    if not layout.get("sp"):
        out["all_reduce"] = gas * (N * d * (1 + 4 * L) + fwl) * f
        return out
    per_block_norm_bias = 2 * 2 * d + 2 * d  # two SP norms' weight and bias, two row-parallel biases
    out["all_gather_into_tensor"] = gas * (2 * L + 1 + 2 * L + 1) * N * d * f
    out["reduce_scatter_tensor"] = gas * (2 * L + 1 + 2 * L + 1) * N * d * f
    out["all_reduce"] = gas * (fwl - N * d + L * per_block_norm_bias + 2 * d) * f
    return out


def worker(rank: int, world: int, port: int, args, results_path: str) -> None:
    cuda = args.device == "cuda"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cuda" if cuda else "cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    install_counters()
    import torch.distributed as dist

    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    import deepspeed

    deepspeed.init_distributed(backend, dist_init_required=False, verbose=False)
    from deepspeed.utils import logger

    logger.setLevel("ERROR")
    from fwl_scale.parallel import init_parallel_state
    from fwl_scale.train.distributed import DistInfo
    from fwl_scale.train.engine import build_training_engine
    from fwl_scale.parallel.spawned import exit_spawned_rank

    report = []
    for name, layout, micro, gas in LAYOUTS:
        cfg = make_cfg(args, micro=micro, gas=gas, device=args.device, **layout)
        ps = init_parallel_state(cfg)
        info = DistInfo(rank, world, rank, ps.dp_size, device, backend)
        torch.manual_seed(0)
        te = build_training_engine(cfg, ps, info)
        from fwl_scale.model import build_model

        params = build_model(cfg.model, device="meta").param_counts()["total"]  # (ZeRO-3 empties the local ones)
        g = torch.Generator().manual_seed(1)

        def batches():
            out = []
            for _ in range(gas):
                ids = torch.randint(0, 4096, (micro, cfg.model.seq_len), generator=g).to(device)
                out.append({"input_ids": ids, "labels": ids.roll(-1, 1), "doc_ids": torch.zeros_like(ids)})
            return out

        def step():
            mine = batches()
            if te.is_pipeline:
                te.pipeline_step.run(mine)
                return
            for i, b in enumerate(mine):
                te.engine.set_gradient_accumulation_boundary(i == gas - 1)
                te.engine.backward(te.engine(*b.values()).loss)
            te.engine.step()

        step()  # warm-up (buffers, first-use work)
        COUNTS.clear()
        dist.barrier()
        COUNTING["on"] = True
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        dist.barrier()
        elapsed = (time.perf_counter() - t0) / args.steps
        COUNTING["on"] = False
        measured = {k: (c / args.steps, b / args.steps) for k, (c, b) in COUNTS.items() if k != "barrier"}
        tokens = 8 * cfg.model.seq_len
        report.append({"name": name, "step_s": elapsed, "tokens_per_s": tokens / elapsed, "measured": measured,
                       "analytic": analytic(cfg, layout, params), "params": params})
        del te
    if rank == 0:
        Path(results_path).write_text(json.dumps(report))
    dist.destroy_process_group()
    exit_spawned_rank()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: one GPU per rank over NCCL (fp32, so that the bytes match the analytic figures)")
    args = ap.parse_args()
    import tempfile

    import torch.multiprocessing as mp

    from fwl_scale.train.distributed import free_port

    results = Path(tempfile.mkdtemp()) / "bench_parallel.json"
    mp.start_processes(worker, args=(2, free_port(), args, str(results)), nprocs=2, start_method="spawn")
    report = json.loads(results.read_text())
    mb = 1e6
    where = "2 NCCL ranks, one GPU each" if args.device == "cuda" else "2 gloo ranks on CPU, 1 thread each"
    print(f"bench_parallel: {where} | FWL model d={args.d}, {args.layers} layers, "
          f"T={args.seq}, V=4096, fp32 | {report[0]['params'] / 1e6:.2f}M parameters | global batch "
          f"8 × {args.seq} tokens per step | {args.steps} steps timed after 1 warm-up")
    print(f"\n{'layout':<18}{'step (s)':>10}{'tokens/s':>12}")
    by = {r["name"]: r for r in report}
    for r in report:
        print(f"{r['name']:<18}{r['step_s']:>10.3f}{r['tokens_per_s']:>12.0f}")
    print(f"\nstep time tp=2 / tp=1 (dp=2): {by['tp=2 ZeRO-1']['step_s'] / by['dp=2 ZeRO-1']['step_s']:.2f}"
          f"   tp=2+SP / tp=2: {by['tp=2+SP ZeRO-1']['step_s'] / by['tp=2 ZeRO-1']['step_s']:.2f}"
          f"   ZeRO-3 / ZeRO-1 (dp=2): {by['dp=2 ZeRO-3']['step_s'] / by['dp=2 ZeRO-1']['step_s']:.2f}")
    print("\ncollectives per step on rank 0: calls, MB handed to the collective (all-reduce: its tensor, "
          "all-gather: output, reduce-scatter: input), and the analytic MB")
    for r in report:
        print(f"\n  {r['name']}")
        for k, (calls, b) in sorted(r["measured"].items(), key=lambda kv: -kv[1][1]):
            a = r["analytic"].get(k)
            ana = f"{a / mb:>10.3f} MB analytic" if a is not None else ""
            print(f"    {k:<28}{calls:>6.0f} calls {b / mb:>10.3f} MB measured {ana}")


if __name__ == "__main__":
    main()
