"""How a GPT is cut into pipeline stages (parallel.pp > 1): its DeepSpeed layers in order, the stage
boundaries, and the single-process names of what each layer holds. Training builds its PipelineModule from
this (train/pipeline.py); evaluation builds one stage and loads its checkpoint files from it
(fwl_scale/eval/stages.py).

    layer 0         embed  the token embedding                 (EmbedStage; a TiedLayerSpec when tied)
    layers 1..n     block  one per transformer block           (BlockStage: its parameters are "block.*")
    layer n + 1     tie    the tied embedding on the last stage (UnembedTie; tied embeddings only)
    last layer      head   final norm, FWL, unembedding         (HeadStage)

The layer index is the XX of DeepSpeed's checkpoint files `layer_XX-model_YY-model_states.pt` (YY the
tensor-parallel rank). It does not depend on the number of stages, so a pipeline checkpoint's layers can be
read by any number of stages, or all by one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("embed", "block", "tie", "head")


@dataclass(frozen=True)
class PipelineLayer:
    index: int
    kind: str
    block: int | None = None  # the transformer block of a "block" layer

    def gpt_name(self, name: str) -> str:
        """The single-process parameter name of `name` in this layer's state dict."""
        return f"blocks.{self.block}.{name.removeprefix('block.')}" if self.kind == "block" else name


def pipeline_layers(n_blocks: int, tied: bool) -> list[PipelineLayer]:
    kinds = [("embed", None)] + [("block", i) for i in range(n_blocks)] + ([("tie", None)] if tied else [])
    kinds.append(("head", None))
    return [PipelineLayer(i, kind, block) for i, (kind, block) in enumerate(kinds)]


def stage_bounds(n_blocks: int, tied: bool, stages: int) -> list[int]:
    """Layer boundaries of the stages: the blocks balanced over the stages (DeepSpeed's "type:BlockStage"
    partition, which train/pipeline.py checks it got), the embedding on the first stage, the head on the
    last. Stage s holds layers [bounds[s], bounds[s + 1])."""
    # DeepSpeed picks its accelerator on import: imported only when a pipeline is built.
    from deepspeed.runtime.utils import partition_balanced

    weights = [1 if layer.kind == "block" else 0 for layer in pipeline_layers(n_blocks, tied)]
    return [int(x) for x in partition_balanced(weights=weights, num_parts=stages)]


def stage_layers(n_blocks: int, tied: bool, stages: int, stage: int) -> list[PipelineLayer]:
    bounds = stage_bounds(n_blocks, tied, stages)
    return pipeline_layers(n_blocks, tied)[bounds[stage]:bounds[stage + 1]]


def materialize(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Replaces every meta parameter under `module` by uninitialised memory on `device`, keeping the
    parameter's Python attributes (the tensor-parallel shard bookkeeping)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty(p.shape, dtype=dtype or p.dtype, device=device),
                                   requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                sub._parameters[name] = new
