"""Adapters over DeepSpeed's optimizer wrappers: each reads and writes one parameter's fp32 master weight
and Adam moments in full over the data-parallel group (tensor-parallel-local), whatever wrapper holds them.

    TorchAdapter        ZeRO 0, fp32: the torch AdamW on the parameters themselves
    UnfusedFP16Adapter  ZeRO 0, bf16 (plain engine, torch Adam): an fp32 copy of each parameter with its state
    FusedFP16Adapter    the same with a fused Adam: flat fp32 copies of each group, Adam state on the flat tensor
    FragmentAdapter     ZeRO 1/2, and the bf16 optimizer (pipeline): flat fp32 partitions linked to each
                        parameter by DeepSpeed's tensor fragments (safe_get/set_full_*)
    Zero3Adapter        ZeRO 3: every parameter partitioned over dp (safe_get_full_* gathers; set: this
                        rank's padded partition through safe_set_local_*)

The `get` of the fragment and ZeRO-3 adapters is collective over the data-parallel group: call it for the
same parameters in the same order on every rank of the group.

DeepSpeed is imported inside the functions that need it, never at module level: it picks its accelerator
when first imported, and this module is imported (through train/loop.py) before the trainer has set the
environment that choice depends on (train/distributed.py: init_distributed).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fwl_scale.checkpoint.native import CheckpointError

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _copied(param: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """fp32 copies of a tensor and its Adam moments (zeros where Adam has not stepped yet)."""
    out = {"param": param.detach().float().clone()}
    for k in STATE_KEYS:
        out[k] = state[k].detach().float().clone() if k in state else torch.zeros_like(out["param"])
    return out


class OptimizerAdapter:
    """What every wrapper shares: the torch optimizer underneath (`base`), Adam's state and step count."""

    def __init__(self, opt, base: torch.optim.Optimizer):
        self.opt = opt
        self.base = base

    def stepped_tensors(self) -> list[Tensor]:
        """The tensors Adam's state is kept for."""
        return [t for g in self.base.param_groups for t in g["params"]]

    def ensure_states(self) -> None:
        """Adam's state exists only after a first step; create it (zeros, step 0) where it is missing."""
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for t in self.stepped_tensors():
            st = self.base.state[t]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(0.0, dtype=scalar)
                st["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)

    def optimizer_step(self) -> int:
        steps = {int(float(st["step"])) for st in self.base.state.values() if "step" in st}
        if len(steps) > 1:
            raise CheckpointError(f"the optimizer's parameters disagree on Adam's step count: {sorted(steps)}")
        return steps.pop() if steps else 0

    def set_optimizer_step(self, step: int) -> None:
        for t in self.stepped_tensors():
            st = self.base.state[t]
            st["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st.get("step")) else step

    def get(self, p: nn.Parameter) -> dict[str, Tensor]:
        """fp32 param, exp_avg, exp_avg_sq of `p`, whole over data parallelism (tensor-parallel-local)."""
        raise NotImplementedError

    def set(self, p: nn.Parameter, values: dict[str, Tensor]) -> None:
        """`values`: this rank's tensor-parallel-local full tensors (param, exp_avg, exp_avg_sq), fp32.
        Call ensure_states() first."""
        raise NotImplementedError


class TorchAdapter(OptimizerAdapter):
    def __init__(self, opt):
        super().__init__(opt, opt)

    def get(self, p):
        return _copied(p, self.base.state.get(p, {}))

    def set(self, p, values):
        p.data.copy_(values["param"].to(p.dtype))
        st = self.base.state[p]
        for k in STATE_KEYS:
            st[k].copy_(values[k].to(st[k].dtype))


class UnfusedFP16Adapter(OptimizerAdapter):
    def __init__(self, opt):
        super().__init__(opt, opt.optimizer)
        self.master = {id(lp): hp for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups)
                       for lp, hp in zip(lp_group, hp_group)}

    def get(self, p):
        master = self.master[id(p)]
        return _copied(master, self.base.state.get(master, {}))

    def set(self, p, values):
        master = self.master[id(p)]
        master.data.copy_(values["param"])
        st = self.base.state[master]
        for k in STATE_KEYS:
            st[k].copy_(values[k].to(st[k].dtype))
        p.data.copy_(values["param"].to(p.dtype))


class FusedFP16Adapter(OptimizerAdapter):
    def __init__(self, opt):
        super().__init__(opt, opt.optimizer)
        self.flat_at: dict[int, tuple[int, int]] = {}  # id(param) -> (group, offset in the flat fp32 copy)
        for i, group in enumerate(opt.fp16_groups):
            offset = 0
            for p in group:
                self.flat_at[id(p)] = (i, offset)
                offset += p.numel()

    def _slices(self, p: nn.Parameter) -> tuple[Tensor, dict[str, Tensor], slice]:
        i, off = self.flat_at[id(p)]
        flat = self.opt.fp32_groups_flat[i]
        return flat, self.base.state[flat], slice(off, off + p.numel())

    def get(self, p):
        flat, st, at = self._slices(p)
        out = {"param": flat.detach()[at].view(p.shape).float().clone()}
        for k in STATE_KEYS:
            out[k] = st[k].detach()[at].view(p.shape).float().clone()
        return out

    def set(self, p, values):
        flat, st, at = self._slices(p)
        flat.data[at].copy_(values["param"].flatten())
        for k in STATE_KEYS:
            st[k][at].copy_(values[k].flatten())
        p.data.copy_(values["param"].to(p.dtype))


class FragmentAdapter(OptimizerAdapter):
    def __init__(self, opt):
        super().__init__(opt, opt.optimizer)

    def ensure_states(self) -> None:
        """Also links the new state to the parameters' fragments."""
        super().ensure_states()
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state  # see module doc

        lp_groups = getattr(self.opt, "bit16_groups", None) or self.opt.bf16_groups
        flat = getattr(self.opt, "single_partition_of_fp32_groups", None) or self.opt.fp32_groups_flat_partition
        for lp, hp in zip(lp_groups, flat):
            lazy_init_hp_params_optimizer_state(lp, hp, self.base.state)

    def get(self, p):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # see module doc

        out = {"param": safe_get_full_fp32_param(p).detach().float().clone()}
        for k in STATE_KEYS:
            out[k] = safe_get_full_optimizer_state(p, k).detach().float().clone()
        return out

    def set(self, p, values):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # see module doc

        safe_set_full_fp32_param(p, values["param"])
        for k in STATE_KEYS:
            safe_set_full_optimizer_state(p, values[k], k)
        p.data.copy_(values["param"].to(p.dtype))


class Zero3Adapter(FragmentAdapter):
    """The get of the fragment adapter (safe_get_full_* gathers the partitions); set writes this rank's
    partition."""

    def stepped_tensors(self) -> list[Tensor]:
        return list(self.opt.fp32_partitioned_groups_flat)  # ZeRO-3 empties its optimizer's groups between steps

    def ensure_states(self) -> None:
        OptimizerAdapter.ensure_states(self)  # no fragments to link

    def set(self, p, values):
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state  # see module doc

        part = p.ds_tensor.numel()
        group = p.ds_process_group
        rank, size = dist.get_rank(group=group), dist.get_world_size(group=group)

        def mine(t: Tensor) -> Tensor:  # this rank's slice of the flattened tensor, padded to part × size
            padded = torch.zeros(part * size, dtype=torch.float32, device=t.device)
            padded[: t.numel()] = t.flatten()
            return padded[rank * part:(rank + 1) * part]

        safe_set_local_fp32_param(p, mine(values["param"]))
        for k in STATE_KEYS:
            safe_set_local_optimizer_state(p, mine(values[k]), k)
        p.ds_tensor.data.copy_(mine(values["param"]).to(p.ds_tensor.dtype))


def optimizer_adapter(engine) -> OptimizerAdapter:
    """The adapter for the optimizer wrapper of a DeepSpeed engine."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer  # (all five: see module doc)
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    for wrappers, adapter in (((DeepSpeedZeroOptimizer_Stage3,), Zero3Adapter),
                              ((DeepSpeedZeroOptimizer, BF16_Optimizer), FragmentAdapter),
                              ((FP16_Optimizer,), FusedFP16Adapter),
                              ((FP16_UnfusedOptimizer,), UnfusedFP16Adapter),
                              ((torch.optim.Optimizer,), TorchAdapter)):
        if isinstance(opt, wrappers):
            return adapter(opt)
    raise CheckpointError(f"unsupported optimizer wrapper {type(opt).__name__} for checkpoint conversion")
