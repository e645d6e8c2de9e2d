"""A checkpoint's model weights in one process, without DeepSpeed's engine (evaluation, export): from a
native checkpoint of one tensor-parallel rank (its pipeline stages' layer files together), a universal one,
or a consolidated file.

    weights = load_model_weights(resolve_checkpoint(path))     # {single-process name: fp32 tensor}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fwl_scale.checkpoint.native import CheckpointError, CheckpointRef
from fwl_scale.checkpoint.universal import UniversalReader
from fwl_scale.parallel.stages import PipelineLayer, pipeline_layers


def load_model_weights(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The model's weights (fp32 where the optimizer kept fp32 masters) from a checkpoint, in one
    process without DeepSpeed's engine: for evaluation and export."""
    if ref.meta.get("universal"):
        reader = UniversalReader(ref.path)
        return {n: reader.get(n).float() for n in reader.names()}
    layout = ref.meta.get("layout") or {}
    if layout.get("tp", 1) > 1:
        raise CheckpointError(f"checkpoint {ref.path} is split over tp={layout.get('tp', 1)}, pp={layout.get('pp', 1)} "
                              f"ranks; convert it first (it starts the processes itself): fwl ckpt convert {ref.path} "
                              "NEW_RUN_DIR, then use NEW_RUN_DIR")
    if layout.get("pp", 1) > 1:
        return load_pipeline_layer_weights(ref, 0)
    saved_zero = int(ref.meta.get("zero_stage") or 0)
    bf16 = bool(ref.meta.get("bf16"))
    try:
        if saved_zero > 0 or bf16:
            # Master weights live in the optimizer shards; DeepSpeed's converter reassembles them (imported
            # here: only these checkpoints need DeepSpeed, which picks its accelerator on import).
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
        else:
            files = sorted(ref.path.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise FileNotFoundError(f"no mp_rank_*_model_states.pt in {ref.path}")
            state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    except (RuntimeError, OSError, KeyError, ValueError, AssertionError, EOFError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ref.path} cannot be read (corrupt or incomplete): "
                              f"{type(e).__name__}: {str(e)[:400]}") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _without_fp32_weights(ref: CheckpointRef) -> str | None:
    """Why DeepSpeed's per-rank model files of `ref` do not hold its fp32 weights (None: they do)."""
    zero = int(ref.meta.get("zero_stage") or 0)
    return ("its fp32 weights are in the optimizer's state (bf16)" if ref.meta.get("bf16") else
            "its weights are partitioned by ZeRO-3" if zero >= 3 else None)


def _refuse(ref: CheckpointRef, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ref.path}: {why}; convert it first (it starts the processes itself): "
                           f"fwl ckpt convert {ref.path} NEW_RUN_DIR, then use NEW_RUN_DIR (at any parallel.tp)")


def _read_module_file(ref: CheckpointRef, name: str, what: str, key: str | None) -> dict[str, torch.Tensor]:
    path = ref.path / name
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state[key] if key is not None else state
    except (RuntimeError, OSError, KeyError, EOFError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ref.path}: {what}'s weights ({path.name}) cannot be read: "
                              f"{type(e).__name__}: {str(e)[:400]}") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_tp_shard_weights(ref: CheckpointRef, tp_rank: int) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank `tp_rank`'s weights (its shards, the replicated tensors whole) from a native
    checkpoint written at that tp, without DeepSpeed's engine: the model state DeepSpeed saved for that
    model-parallel rank (every pipeline stage's layers, with pp > 1). That state is the fp32 weights
    themselves only without bf16 and below ZeRO-3; other checkpoints are refused with the conversion that
    makes them loadable at any tp."""
    if int((ref.meta.get("layout") or {}).get("pp", 1)) > 1:
        return load_pipeline_layer_weights(ref, tp_rank)
    why = _without_fp32_weights(ref)
    if why is not None:
        raise _refuse(ref, why)
    return _read_module_file(ref, f"mp_rank_{tp_rank:02d}_model_states.pt", f"tensor-parallel rank {tp_rank}", "module")


def load_pipeline_layer_weights(ref: CheckpointRef, tp_rank: int,
                                layers: list[PipelineLayer] | None = None) -> dict[str, torch.Tensor]:
    """The weights in the layer files of a pipeline checkpoint (tensor-parallel rank `tp_rank`'s shards),
    under their single-process names: those of `layers` (one stage's, parallel/stages.py), or all. The tied
    embedding is in two layer files (first and last stage), equal."""
    why = _without_fp32_weights(ref)
    if why is not None:
        raise _refuse(ref, why)
    if layers is None:
        model = ref.meta.get("model") or {}
        layers = pipeline_layers(int(model["n_layers"]), bool(model.get("tie_embeddings", True)))
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        name = f"layer_{layer.index:02d}-model_{tp_rank:02d}-model_states.pt"
        what = f"pipeline layer {layer.index} ({layer.kind}), tensor-parallel rank {tp_rank}"
        for k, v in _read_module_file(ref, name, what, None).items():
            out.setdefault(layer.gpt_name(k), v)
    return out


def read_consolidated(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, config dict) of a consolidated file (`fwl ckpt consolidate`)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}
    return weights, json.loads(meta.get("config", "{}"))
