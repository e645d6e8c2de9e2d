"""The parallel layout and global batch of a Slurm job, derived from its allocation and checked, before any
training process starts (`fwl layout`, which launchers/common.sh runs through launchers/plan_layout.py).

It loads the config with the given overrides (so a user's `parallel.tp=...` on the sbatch command line
counts), derives dp = world / (tp*cp*pp) and grad_accum = global_batch / (micro_batch * dp), and validates
the whole config against the world size (fwl_scale.config). It never imports torch, so the check costs well
under a second.
"""
from __future__ import annotations

from fwl_scale.config import ConfigError, check_layout, load_config


class LayoutError(Exception):
    """The layout does not fit the allocation."""


def plan_allocation(config: str, overrides: list[str], nodes: int, tasks_per_node: int, gpus_per_node: int,
                    global_batch: int | None) -> tuple[list[str], str]:
    """Returns (layout overrides, summary) or raises LayoutError / ConfigError."""
    alloc = f"{nodes} node(s) x {tasks_per_node} task(s)"
    if nodes < 1 or tasks_per_node < 1:
        raise LayoutError(f"allocation {alloc} has no ranks")
    if gpus_per_node > 0 and tasks_per_node != gpus_per_node:
        raise LayoutError(
            f"one srun task per GPU: --ntasks-per-node ({tasks_per_node}) must equal the GPUs per node "
            f"({gpus_per_node}); edit the #SBATCH block of the launcher")
    world = nodes * tasks_per_node
    cfg = load_config(config, overrides)
    p = cfg.parallel
    model_parallel = p.tp * p.cp * p.pp
    try:  # world a multiple of tp*cp*pp, and a parallel.dp given in the config consistent with it
        dp = check_layout(cfg, world)
    except ConfigError as e:
        raise LayoutError(f"{alloc} = {world} ranks: {e}") from None
    if tasks_per_node % p.tp != 0 and p.tp < tasks_per_node:
        raise LayoutError(f"parallel.tp = {p.tp} does not divide the {tasks_per_node} ranks of a node, so "
                          f"tensor-parallel groups would straddle nodes; use a tp that divides {tasks_per_node}")
    grad_accum = p.grad_accum
    if global_batch is not None:
        per_step = p.micro_batch * dp
        if global_batch % per_step != 0:
            raise LayoutError(
                f"global batch {global_batch} is not a multiple of micro_batch * dp = {p.micro_batch} * {dp} "
                f"= {per_step} ({alloc}, tp*cp*pp = {model_parallel}); change FWL_GLOBAL_BATCH, "
                f"parallel.micro_batch or the node count")
        grad_accum = global_batch // per_step
    layout = [f"parallel.dp={dp}", f"parallel.grad_accum={grad_accum}"]
    # The final config, exactly as the trainer will see it, validated against the world size.
    final = load_config(config, overrides + layout)
    check_layout(final, world)
    batch = final.parallel.micro_batch * grad_accum * dp
    summary = (f"layout: {alloc} = {world} ranks; tp={p.tp} cp={p.cp} pp={p.pp} dp={dp}; "
               f"global batch {batch} = micro_batch {p.micro_batch} x grad_accum {grad_accum} x dp {dp} "
               f"({batch * final.model.seq_len} tokens/step)")
    if p.tp > tasks_per_node:
        summary += f"\nwarning: tp = {p.tp} spans nodes ({tasks_per_node} ranks per node): expect slow all-reduces"
    return layout, summary
