"""`fwl plan`: the layout planner (fwl_scale/plan/planner.py) and its memory model's state accounting."""
import pytest

from fwl_scale.cli import main
from fwl_scale.config import ConfigError, load_config
from fwl_scale.plan.allocation import plan_allocation
from fwl_scale.plan.memory import estimate, param_split
from fwl_scale.plan.planner import GIB, Hardware, Layout, apply, parse_bytes, plan


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_model_state_per_zero_stage_is_the_zero_papers_accounting(zero):
    cfg = load_config("configs/fwl_125m.yaml")
    split = param_split(cfg)
    dp = 4
    lay = Layout(tp=1, cp=1, pp=1, dp=dp, zero_stage=zero, micro_batch=1, grad_accum=1, checkpointing=False)
    mem = estimate(apply(cfg, lay), dp, split)
    P = split.total
    # bf16 mixed precision: weights 2, gradients 2, fp32 master + Adam moments 12 bytes per parameter.
    want = {0: 16 * P, 1: 4 * P + 12 * P / dp, 2: 2 * P + 14 * P / dp,
            3: 16 * P / dp + 2 * 2 * split.body / cfg.model.n_layers}[zero]
    assert mem.state == pytest.approx(want, rel=1e-12)


def test_plan_ranks_fitting_layouts_and_refuses_the_rest_with_reasons():
    cfg = load_config("configs/fwl_1b.yaml")
    hw = Hardware(gpus=16, gpu_memory=80 * GIB)
    verdicts = plan(cfg, hw, global_batch=64)
    fits = [v for v in verdicts if v.reason is None]
    refused = [v for v in verdicts if v.reason is not None]
    assert fits and refused
    times = [v.step_s for v in fits]
    assert times == sorted(times)
    assert all(v.memory.total <= 0.9 * 80 * GIB for v in fits)
    assert all(v.layout.tp * v.layout.cp * v.layout.pp * v.layout.dp == 16 for v in verdicts)
    assert all(v.layout.micro_batch * v.layout.grad_accum * v.layout.dp == 64 for v in verdicts)
    by_rule = [v for v in refused if v.layout.pp > 1 and v.layout.zero_stage >= 2]
    assert by_rule and all("parallel.zero_stage" in v.reason for v in by_rule)
    by_memory = [v for v in refused if v.memory is not None]
    assert by_memory and all(v.memory.total > 0.9 * 80 * GIB and "GiB usable" in v.reason for v in by_memory)
    # Checkpointing trades memory for time: at the same layout it needs less and is predicted slower.
    base = next(v for v in fits if not v.layout.checkpointing)
    twin = next(v for v in verdicts if v.layout == Layout(**{**base.layout.__dict__, "checkpointing": True}))
    assert twin.memory.total < base.memory.total and twin.step_s > base.step_s


def test_the_planners_best_layout_passes_the_slurm_launchers_check():
    cfg = load_config("configs/fwl_1b.yaml")
    best = plan(cfg, Hardware(gpus=16, gpu_memory=80 * GIB), global_batch=128)[0]
    lay = best.layout
    # What launchers/plan_layout.py (`fwl layout`) runs for the allocation.
    layout, _ = plan_allocation("configs/fwl_1b.yaml", [o for o in best.layout.overrides()
                                                        if not o.startswith(("parallel.dp", "parallel.grad_accum"))],
                                nodes=2, tasks_per_node=8, gpus_per_node=8, global_batch=128)
    assert layout == [f"parallel.dp={lay.dp}", f"parallel.grad_accum={lay.grad_accum}"]


def test_cli_prints_the_ranked_table(capsys):
    assert main(["plan", "configs/fwl_125m.yaml", "--gpus", "8", "--gpu-memory", "40GiB", "--global-batch", "32",
                 "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "layout(s) fit" in out and "best: fwl train configs/fwl_125m.yaml parallel.tp=" in out


def test_a_size_that_cannot_fit_is_refused_naming_it(capsys):
    assert main(["plan", "configs/fwl_13b.yaml", "--gpus", "2", "--gpu-memory", "80GiB", "--global-batch", "8"]) == 2
    err = capsys.readouterr().err
    assert "configs/fwl_13b.yaml" in err and "does not fit 2 GPU(s) of 80GiB" in err and "GiB usable" in err


def test_bad_memory_size_names_the_option():
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("141GB") == 141e9
    with pytest.raises(ConfigError, match="--gpu-memory: cannot read 'eighty'"):
        parse_bytes("eighty")
