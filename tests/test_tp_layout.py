"""The parallel layout (rank order tp, cp, dp, pp; validation with errors naming the field) and the
tensor-parallel bookkeeping that needs no communication: shard slicing, shard attributes, parameter
counts and the initialisation of a tensor-parallel model (a slice of the tp = 1 one), in one process.
The collectives and the model's numbers across ranks are tested in test_tp_model.py. And every ladder
launcher's layout planned by launchers/plan_layout.py for its own #SBATCH allocation."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fwl_scale.config import ConfigError, load_config
from fwl_scale.model import build_model
from fwl_scale.parallel import Layout, TPContext, init_parallel_state, merge_shards, plan_layout, take_shard
from fwl_scale.parallel.shards import full_shape, is_sharded, shard_of

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.d_model=16", "model.n_heads=4", "model.n_layers=2", "model.seq_len=16", "model.vocab_size=50",
         "model.vocab_multiple=64"]


def test_rank_order_is_tp_cp_dp_pp_with_tp_fastest():
    lay = Layout(tp=2, cp=2, dp=2, pp=2)
    assert lay.world_size == 16
    for r in range(16):
        assert lay.rank_of(**lay.coords(r)) == r
    assert lay.coords(1) == {"tp": 1, "cp": 0, "dp": 0, "pp": 0}
    assert lay.coords(2) == {"tp": 0, "cp": 1, "dp": 0, "pp": 0}
    assert lay.coords(4) == {"tp": 0, "cp": 0, "dp": 1, "pp": 0}
    assert lay.coords(8) == {"tp": 0, "cp": 0, "dp": 0, "pp": 1}
    assert lay.group_ranks(("tp",))[:2] == [[0, 1], [2, 3]]
    assert lay.group_ranks(("pp",))[0] == [0, 8]
    assert lay.group_ranks(("cp", "dp"))[0] == [0, 2, 4, 6]
    for axes in [("tp",), ("cp",), ("dp",), ("pp",), ("cp", "dp"), ("tp", "pp")]:
        groups = lay.group_ranks(axes)
        assert sorted(r for g in groups for r in g) == list(range(16)), axes  # a partition of the world
        size = 1
        for a in axes:
            size *= getattr(lay, a)
        assert all(len(g) == size for g in groups)


def test_deepspeed_topology_order_when_cp_is_one():
    """DeepSpeed's PipeModelDataParallelTopology puts model (tp) fastest, then data, then pipe."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    lay = Layout(tp=2, cp=1, dp=2, pp=2)
    for r in range(8):
        c = topo.get_coord(r)
        assert lay.coords(r) == {"tp": c.model, "cp": 0, "dp": c.data, "pp": c.pipe}
    # With cp > 1 DeepSpeed's data axis is cp × dp, and every group coincides with ours.
    lay = Layout(tp=2, cp=2, dp=2, pp=2)
    topo = lay.deepspeed_topology()
    assert sorted(topo.get_axis_comm_lists("model")) == lay.group_ranks(("tp",))
    assert sorted(topo.get_axis_comm_lists("data")) == lay.group_ranks(("cp", "dp"))
    assert sorted(topo.get_axis_comm_lists("pipe")) == lay.group_ranks(("pp",))


def test_plan_layout_infers_dp_and_validates():
    cfg = load_config(None, SMALL + ["parallel.tp=2", "parallel.pp=2"])
    assert plan_layout(cfg, 8) == Layout(tp=2, cp=1, dp=2, pp=2)


@pytest.mark.parametrize("overrides, world, field", [
    (["parallel.tp=4"], 6, "world size 6"),
    (["parallel.tp=2", "parallel.dp=3"], 4, "parallel.dp"),
    (["parallel.tp=8"], 8, "parallel.tp"),  # 8 does not divide n_heads = 4
    (["parallel.pp=4"], 4, "parallel.pp"),  # 4 does not divide n_layers = 2
    (["parallel.pp=2", "parallel.zero_stage=2"], 2, "parallel.zero_stage"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=15"], 2, "parallel.sequence_parallel"),
    (["parallel.cp=2", "model.seq_len=15"], 2, "parallel.cp"),
])
def test_bad_layouts_name_the_field(overrides, world, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        plan_layout(load_config(None, SMALL[:-1] + ["model.vocab_multiple=64"] + overrides), world)


def test_padded_vocabulary_must_split_over_tp():
    cfg = load_config(None, ["model.d_model=96", "model.n_heads=6", "model.vocab_size=4096",
                             "model.vocab_multiple=128", "parallel.tp=3"])
    with pytest.raises(ConfigError, match=r"parallel\.tp: 3 must divide the padded vocabulary \(4096"):
        plan_layout(cfg, 3)


def test_single_process_state_needs_no_torch_distributed(monkeypatch):
    # In-process trainer tests may have left a one-rank process group behind; this test is about none.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    ps = init_parallel_state(load_config(None, SMALL))
    assert ps.layout == Layout(1, 1, 1, 1) and ps.tp_context() is None
    assert ps.get_data_parallel_world_size() == 1 and ps.get_model_parallel_world_size() == 1
    with pytest.raises(ConfigError, match="needs torch.distributed"):
        init_parallel_state(load_config(None, SMALL + ["parallel.tp=2"]), world_size=2, rank=0)


def test_take_and_merge_shards_with_fused_blocks():
    full = torch.arange(3 * 8 * 2).reshape(24, 2)  # q|k|v rows, 8 each
    shards = [take_shard(full, 0, r, 4, stride=3) for r in range(4)]
    # Rank 1 holds rows 2..3 of each of q, k and v.
    assert shards[1][:, 0].tolist() == [x * 2 for x in [2, 3, 10, 11, 18, 19]]
    assert torch.equal(merge_shards(shards, 0, stride=3), full)
    cols = [take_shard(full.t(), 1, r, 2) for r in range(2)]
    assert torch.equal(merge_shards(cols, 1), full.t())


@pytest.mark.parametrize("fwl", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_tensor_parallel_init_is_a_slice_of_the_single_process_init(fwl, tied):
    """Construction needs no communication, so one process can build every rank's part: each rank's
    parameters are slices of the tp = 1 model drawn from the same seed, every tensor-parallel
    parameter carries the attributes DeepSpeed's clipping reads, and the counts are the whole model's."""
    over = SMALL + [f"model.fwl.enabled={str(fwl).lower()}", f"model.tie_embeddings={str(tied).lower()}"]
    if not tied:
        over.append("model.fwl.width=8")
    cfg = load_config(None, over)
    torch.manual_seed(3)
    ref = build_model(cfg.model)
    ref_params = dict(ref.named_parameters())
    tp = 2
    per_rank = []
    for rank in range(tp):
        torch.manual_seed(3)
        m = build_model(cfg.model, parallel=TPContext(group=None, size=tp, rank=rank))
        assert m.param_counts() == ref.param_counts()
        assert m.param_counts(local=True)["total"] < ref.param_counts()["total"]
        assert list(dict(m.named_parameters())) == list(ref_params)
        for name, p in m.named_parameters():
            assert full_shape(p) == ref_params[name].shape, name
            assert torch.equal(p, shard_of(p, ref_params[name])), name
        per_rank.append(dict(m.named_parameters()))
    shards = per_rank[0]
    assert shards["blocks.0.attn.qkv.weight"].partition_stride == 3
    expect_sharded = {"embed.weight": 0, "blocks.0.attn.qkv.weight": 0, "blocks.0.attn.qkv.bias": 0,
                      "blocks.0.attn.proj.weight": 1, "blocks.0.mlp.fc.weight": 0, "blocks.0.mlp.fc.bias": 0,
                      "blocks.0.mlp.proj.weight": 1}
    if fwl:
        expect_sharded.update({"fwl.w1": 0, "fwl.b1": 0, "fwl.w2": 1, "fwl.out_bias": 0})
    if not tied:
        expect_sharded["lm_head.weight"] = 0
    for name, p in shards.items():
        name = name.replace("blocks.1.", "blocks.0.")
        if name in expect_sharded:
            assert p.tensor_model_parallel and p.model_parallel and p.partition_dim == expect_sharded[name], name
        else:
            assert not is_sharded(p) and not p.model_parallel, name
    # The shards of every parameter put together give the tp = 1 tensor back.
    for name, p in shards.items():
        if is_sharded(p):
            whole = merge_shards([r[name].detach() for r in per_rank], p.partition_dim, p.partition_stride)
            assert torch.equal(whole, ref_params[name].detach()), name


LAUNCHERS = sorted((ROOT / "launchers").glob("fwl_*.slurm"))


def sbatch_allocation(launcher: Path) -> dict[str, str]:
    """The #SBATCH resources and the FWL_CONFIG / FWL_GLOBAL_BATCH defaults a ladder launcher sets."""
    text = launcher.read_text()
    found = dict(re.findall(r"^#SBATCH --(nodes|ntasks-per-node|gpus-per-node)=(\d+)", text, re.M))
    found.update(re.findall(r'^: "\$\{(FWL_CONFIG|FWL_GLOBAL_BATCH):=([^}]+)\}"', text, re.M))
    assert set(found) == {"nodes", "ntasks-per-node", "gpus-per-node", "FWL_CONFIG", "FWL_GLOBAL_BATCH"}, launcher
    return found


def plan_layout_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers" / "plan_layout.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda p: p.stem)
def test_every_ladder_launcher_plans_for_its_allocation(launcher):
    """What launchers/common.sh runs before any rank starts, with the launcher's own #SBATCH numbers."""
    a = sbatch_allocation(launcher)
    nodes, tasks, batch = int(a["nodes"]), int(a["ntasks-per-node"]), int(a["FWL_GLOBAL_BATCH"])
    proc = plan_layout_cli("--config", a["FWL_CONFIG"], "--nodes", str(nodes), "--tasks-per-node", str(tasks),
                           "--gpus-per-node", a["gpus-per-node"], "--global-batch", str(batch))
    assert proc.returncode == 0, proc.stderr
    pinned = dict(line.split("=") for line in proc.stdout.split())
    cfg = load_config(ROOT / a["FWL_CONFIG"], proc.stdout.split())
    p = cfg.parallel
    assert int(pinned["parallel.dp"]) == p.dp and p.tp * p.cp * p.pp * p.dp == nodes * tasks
    assert p.micro_batch * p.grad_accum * p.dp == batch
    # The same allocation less one task per node does not fit (an uneven dp or a straddling tp group).
    proc = plan_layout_cli("--config", a["FWL_CONFIG"], "--nodes", str(nodes), "--tasks-per-node", str(tasks - 1),
                           "--global-batch", str(batch))
    assert proc.returncode == 2 and "layout does not fit the allocation" in proc.stderr, proc.stderr
