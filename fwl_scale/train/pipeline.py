"""Pipeline parallelism (parallel.pp > 1) on DeepSpeed's PipelineModule and PipelineEngine (1F1B).

The model is cut into DeepSpeed layers that pass one tuple between stages,

    (x [B, T(/tp under SP), d] float, input_ids, labels, doc_ids [B, T] int64)

so the labels and document ids travel with the activations to the last stage, where the FWL needs them
inside its forward (its fast weights adapt to every earlier labelled token). DeepSpeed's pipeline carries
int64 tensors and sends gradients only for the floating ones. Layers (their order and the stage bounds:
fwl_scale/parallel/stages.py, which evaluation builds its stages from too):

    first stage   EmbedStage: the embedding  (TiedLayerSpec "embed" with tied embeddings)
    every stage   one BlockStage per block   (the partition balances blocks: "type:BlockStage")
    last stage    UnembedTie                 (TiedLayerSpec "embed": the same matrix, a pass-through)
                  HeadStage: final norm, FWL (or nothing), unembedding, losses -> the loss

The tied modules hold only the embedding matrix (DeepSpeed marks every parameter of a tied module on the
non-first stage as pipeline-replicated, so nothing else may live in it); the head reads U = that matrix
through GPT.unembedding. DeepSpeed all-reduces its gradient over the two stages (ReduceTiedGrads). Each
tied layer is a module with its own forward rather than a TiedLayerSpec forward_fn: DeepSpeed's
checkpoints save and load only the layers that are modules.

Initialisation: every rank builds the whole GPT on the meta device (the parameters' shapes and tensor-
parallel attributes, no memory), materialises the parameters of its own stage on the CPU and runs
GPT.reset_parameters, whose draws for meta parameters are made and discarded (init_normal_), so every
stage holds exactly its slice of the single-process model.

Groups: with a PipelineModule DeepSpeed takes no mpu; its PipeModelDataParallelTopology (pipe, data =
cp × dp, model = tp) orders ranks as we do (tp fastest, then cp, dp, pp), and `check_groups` verifies that
its groups equal ours before any training.

A training step: train/pipeline_step.py.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fwl_scale.config import Config, check_layout
from fwl_scale.model.gpt import GPT, build_model
from fwl_scale.parallel.layout import ParallelState
from fwl_scale.parallel.stages import materialize, pipeline_layers, stage_bounds
from fwl_scale.train.pipeline_step import PipelineStep

TIE_KEY = "embed"


# ---------------------------------------------------------------------------------------- layers
class EmbedStage(nn.Module):
    """First stage: token ids -> embeddings of this rank's chunk (a sequence chunk under SP/cp). Tied
    (TiedLayerSpec "embed") or not."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.embed = gpt.embed
        object.__setattr__(self, "gpt", gpt)  # not a submodule: only the embedding is held (and tied)

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        ids, labels, docs = inputs
        _, _, start, T_loc = self.gpt.attention_inputs(ids, docs)  # also validates the shapes
        return self.embed(ids[:, start:start + T_loc]), ids, labels, docs


class UnembedTie(nn.Module):
    """Last stage: the tied embedding matrix, registered there for HeadStage (which reads it as U through
    GPT.unembedding); passes the activations on. Each stage builds its tied module from the first spec of
    the key it holds, so the first stage gets an EmbedStage and the last this: a module of its own with a
    forward (not a TiedLayerSpec forward_fn), because DeepSpeed saves and loads only the layers that are
    modules."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.embed = gpt.embed

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return inputs


class BlockStage(nn.Module):
    def __init__(self, gpt: GPT, index: int):
        super().__init__()
        self.block = gpt.blocks[index]
        object.__setattr__(self, "gpt", gpt)

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, ids, labels, docs = inputs
        gpt: GPT = self.gpt
        # Positions and the document mask are recomputed from the document ids (O(B·T²) booleans, against
        # O(B·T²·d) for the attention itself) rather than sent between stages.
        positions, mask, _, _ = gpt.attention_inputs(ids, docs)
        return gpt.run_block(self.block, x, positions, mask), ids, labels, docs


class HeadStage(nn.Module):
    """Final norm, FWL, unembedding and losses. Training: the micro-batch loss (what the pipeline engine
    backpropagates); eval mode: the per-token losses [B, T] (under cp this rank's chunk) for validation by
    position, never with a carried state.

    `carried` (a CarriedState, set by the training step in contiguous mode): the FWL starts each micro-
    batch from the state the previous one left. The last stage runs its forwards in micro-batch order
    (1F1B: forward i, backward i, forward i + 1, ...), so the state passes from micro-batch to micro-batch
    exactly as in one process."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.norm_f = gpt.norm_f
        if gpt.fwl is not None:
            self.fwl = gpt.fwl
        if gpt.lm_head is not None:
            self.lm_head = gpt.lm_head
        object.__setattr__(self, "gpt", gpt)
        self.carried = None

    def forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        x, ids, labels, docs = inputs
        gpt: GPT = self.gpt
        carried = self.carried if self.training else None
        out = gpt.head(gpt.norm_f(x), ids, labels, docs, **(carried.forward_kwargs() if carried else {}))
        if carried is not None:
            carried.advance(out)
        return out.loss if self.training else out.token_loss


# ------------------------------------------------------------------------------------- building
def layer_specs(gpt: GPT) -> list[Any]:
    """DeepSpeed's layers in the order of parallel/stages.pipeline_layers."""
    from deepspeed.pipe import TiedLayerSpec  # DeepSpeed picks its accelerator on import: imported once the environment is set

    tied = gpt.lm_head is None
    layers: list[Any] = []
    for layer in pipeline_layers(len(gpt.blocks), tied):
        if layer.kind == "embed":
            layers.append(TiedLayerSpec(TIE_KEY, EmbedStage, gpt, tied_weight_attr=["embed.weight"]) if tied
                          else EmbedStage(gpt))
        elif layer.kind == "block":
            layers.append(BlockStage(gpt, layer.block))
        elif layer.kind == "tie":
            layers.append(TiedLayerSpec(TIE_KEY, UnembedTie, gpt, tied_weight_attr=["embed.weight"]))
        else:
            layers.append(HeadStage(gpt))
    return layers


def check_groups(module, ps: ParallelState) -> None:
    """DeepSpeed's pipeline groups (from its topology) must be ours: data = dp × cp, pipe = pp, model = tp."""
    grid = module._grid
    checks = [("data-parallel (dp × cp)", sorted(grid.dp_group), ps.group_ranks["dp_cp"]),
              ("pipeline", sorted(grid.pp_group), ps.group_ranks["pp"])]
    if ps.tp_size > 1:
        checks.append(("tensor-parallel", sorted(grid.slice_group), ps.group_ranks["tp"]))
    if grid.get_stage_id() != ps.pp_rank:
        checks.append(("stage", [grid.get_stage_id()], [ps.pp_rank]))
    for what, theirs, ours in checks:
        if list(theirs) != list(ours):
            raise RuntimeError(f"rank {ps.rank}: DeepSpeed's {what} group {theirs} differs from ours {ours}; "
                               "the layouts disagree (tp, cp, dp, pp order)")


@dataclass
class PipelineModel:
    """This rank's stage: DeepSpeed's PipelineModule, the GPT skeleton whose parameters it holds (the rest
    stay on the meta device), and the names of its parameters in the single-process model."""

    module: Any  # deepspeed.pipe.PipelineModule
    gpt: GPT
    gpt_names: dict[str, str]  # PipelineModule parameter name -> GPT parameter name

    @property
    def is_last_stage(self) -> bool:
        return self.module.stage_id == self.module.num_stages - 1

    @property
    def is_first_stage(self) -> bool:
        return self.module.stage_id == 0

    @property
    def head(self) -> HeadStage | None:
        """The last stage's HeadStage (None on the other stages)."""
        return next((f for f in self.module.forward_funcs if isinstance(f, HeadStage)), None)


def build_pipeline_model(cfg: Config, ps: ParallelState) -> PipelineModel:
    """This rank's stage of the model of `cfg`. Seed the global generator identically on every rank
    first (as for build_model): the stages then hold the single-process model's values."""
    from deepspeed.pipe import PipelineModule  # (DeepSpeed: see layer_specs)

    check_layout(cfg)
    import deepspeed  # (see layer_specs)

    if not deepspeed.comm.is_initialized():  # PipelineModule uses DeepSpeed's communication layer at once
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False,
                                   verbose=False, dist_init_required=False)
    gpt = build_model(cfg.model, device="meta", parallel=ps, cp_exchange=cfg.parallel.cp_exchange)
    gpt.set_activation_checkpointing(cfg.train.activation_checkpointing)
    layers = layer_specs(gpt)
    # The partition PipelineModule computes for "type:BlockStage" (checked below): this stage's layers are
    # materialised and initialised before it is built, because it moves them to the device and broadcasts
    # the tied embedding at once.
    parts = stage_bounds(len(gpt.blocks), gpt.lm_head is None, ps.pp_size)
    for layer in layers[parts[ps.pp_rank]:parts[ps.pp_rank + 1]]:
        materialize(layer if isinstance(layer, nn.Module) else layer.module_args[0].embed, torch.device("cpu"))
    with torch.no_grad():
        # The draws of build_model on the CPU, in its order: the FWL initialises itself when constructed,
        # then GPT.reset_parameters draws everything. The stage's parameters get their values, the other
        # draws are made and discarded.
        if gpt.fwl is not None:
            gpt.fwl.reset_parameters()
        gpt.reset_parameters()
    # DeepSpeed prints its partition on rank 0; keep the trainer's output to our own lines.
    quiet = contextlib.redirect_stdout(io.StringIO()) if not os.environ.get("FWL_DEBUG") else contextlib.nullcontext()
    # no_grad: its in-place broadcast of the tied embedding must not enter the parameter's autograd history.
    with quiet, torch.no_grad():
        module = PipelineModule(layers=layers, topology=ps.layout.deepspeed_topology(), loss_fn=None,
                                partition_method="type:BlockStage", activation_checkpoint_interval=0)
    if [int(x) for x in module.parts] != parts:
        raise RuntimeError(f"DeepSpeed partitioned the layers as {list(module.parts)}, expected {parts}")
    check_groups(module, ps)
    by_id = {id(p): n for n, p in gpt.named_parameters()}
    names = {}
    for n, p in module.named_parameters():
        if id(p) not in by_id:
            raise RuntimeError(f"pipeline parameter {n} is not a parameter of the model")
        names[n] = by_id[id(p)]
    return PipelineModel(module=module, gpt=gpt, gpt_names=names)


def deepspeed_pipeline_config(ds_config: dict[str, Any], cfg: Config) -> tuple[dict[str, Any], bool]:
    """Our DeepSpeed config adjusted for the pipeline engine; returns (config, own_clipping)."""
    conf = dict(ds_config)
    own = cfg.parallel.zero_stage == 0 and not cfg.train.bf16
    if own:
        conf["gradient_clipping"] = 0.0
    conf["pipeline"] = {"activation_checkpoint_interval": 0, "pipe_partitioned": False, "grad_partitioned": False}
    return conf, own


def build_pipeline_engine(cfg: Config, ps: ParallelState, ds_config: dict[str, Any],
                          param_groups: Callable[[nn.Module, Config], list[dict[str, Any]]],
                          schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]):
    """(engine, scheduler, PipelineModel, PipelineStep) for this rank's stage."""
    import deepspeed  # (see layer_specs)

    pm = build_pipeline_model(cfg, ps)
    conf, own = deepspeed_pipeline_config(ds_config, cfg)
    quiet = contextlib.redirect_stdout(io.StringIO()) if not os.environ.get("FWL_DEBUG") else contextlib.nullcontext()
    with quiet:
        engine, _, _, scheduler = deepspeed.initialize(
            model=pm.module, model_parameters=param_groups(pm.module, cfg), config=conf,
            lr_scheduler=schedule, dist_init_required=False)
    step = PipelineStep(engine, ps, cfg.train.grad_clip, own)
    return engine, scheduler, pm, step

