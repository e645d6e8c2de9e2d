"""`fwl eval CONFIG CKPT`: validation perplexity and loss by position of a checkpoint, in one process,
optionally on whole long documents in consecutive windows."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fwl_scale.atomic import atomic_write_json
from fwl_scale.checkpoint.native import CheckpointError, check_compatible, resolve_checkpoint
from fwl_scale.checkpoint.weights import load_model_weights, load_pipeline_layer_weights, load_tp_shard_weights
from fwl_scale.config import Config
from fwl_scale.data import eval_documents, prepare_data, valid_batches
from fwl_scale.device import cast_parameters, eval_dtype, resolve_device
from fwl_scale.eval.perplexity import (LongDocResult, evaluate_batches, evaluate_documents, format_eval,
                                       format_long_docs)
from fwl_scale.eval.stages import PipelineStage, StageContext
from fwl_scale.model import build_model
from fwl_scale.parallel.layout import TPContext
from fwl_scale.parallel.shards import load_full_state_dict, shard_of


def _check_shapes(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], ref: Any, cfg: Config,
                  what: str = "") -> None:
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        shape = [k for k in expected if k in got and expected[k] != got[k]][:3]
        raise CheckpointError(f"checkpoint {ref.path}{what} does not fit model {cfg.name}: missing {missing}, "
                              f"unexpected {extra}, other shapes {shape}")


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_for_eval(cfg: Config, checkpoint: str | Path, device: torch.device, tp: TPContext | None = None,
                  stage: StageContext | None = None) -> tuple[torch.nn.Module, Any]:
    """The model of `cfg` with the weights of `checkpoint` (refused if it belongs to another model); with
    `tp`, this rank's tensor-parallel part of it: the rank's own shards of a checkpoint written at that
    tp, or its slices of whole weights (a tp = 1 or a converted checkpoint); with `stage`, this rank's
    pipeline stage of it (eval/stages.py), from the layer files of a pipeline checkpoint or the stage's
    part of any other."""
    ref = resolve_checkpoint(checkpoint)
    check_compatible(ref, cfg)
    saved = {"tp": 1, "pp": 1} if ref.meta.get("universal") else {"tp": 1, "pp": 1, **(ref.meta.get("layout") or {})}
    tp_size, tp_rank = (tp.size, tp.rank) if tp is not None else (1, 0)
    own_shards = tp_size > 1 and saved["tp"] == tp_size
    dtype = eval_dtype(cfg, device)
    if stage is not None:
        model = PipelineStage(cfg.model, stage, tp, device, dtype)
        params = dict(model.named_parameters())
        if saved["pp"] > 1 and (own_shards or tp_size == saved["tp"] == 1):
            state = load_pipeline_layer_weights(ref, tp_rank, model.layers)
        else:
            whole = load_tp_shard_weights(ref, tp_rank) if own_shards else load_model_weights(ref)
            state = {n: whole[n] if own_shards else shard_of(p, whole[n]) for n, p in params.items() if n in whole}
        _check_shapes({n: tuple(p.shape) for n, p in params.items()}, state, ref, cfg,
                      f" (pipeline stage {stage.stage}" + (f", tensor-parallel rank {tp_rank})" if tp_size > 1 else ")"))
        model.load_weights(state)
        return model, ref
    if own_shards:
        state = load_tp_shard_weights(ref, tp_rank)
        model = build_model(cfg.model, device="cpu", parallel=tp)
        _check_shapes(_shapes(model), state, ref, cfg, f" (tensor-parallel rank {tp_rank})")
        model.load_state_dict(state, strict=True)
    else:
        state = load_model_weights(ref)  # refuses a tensor-parallel checkpoint with the conversion command
        _check_shapes(_shapes(build_model(cfg.model, device="meta")), state, ref, cfg)
        model = build_model(cfg.model, device="cpu", parallel=tp)
        load_full_state_dict(model, state)
    model.to(device)
    if dtype is not None:
        cast_parameters(model, dtype)
    model.eval()
    return model, ref


def run_eval(cfg: Config, checkpoint: str | Path, batches: int | None = None, long_docs: int = 0,
             max_windows: int | None = None, json_out: str | None = None) -> dict[str, Any]:
    device = resolve_device(cfg)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's checkpoint converter may be imported
    model, ref = load_for_eval(cfg, checkpoint, device)
    paths = prepare_data(cfg)
    n_batches = batches if batches is not None else cfg.train.eval_batches
    vb = valid_batches(cfg, paths, n_batches, 0, 1)
    result = evaluate_batches(model, vb, cfg.train.position_buckets, device)
    print(f"checkpoint {ref.path} (step {ref.step})")
    print(format_eval(result))
    report: dict[str, Any] = {"checkpoint": str(ref.path), "step": ref.step, "valid": result.as_dict()}
    if long_docs > 0:
        modes = [False, True] if cfg.model.fwl.enabled else [False]
        results: list[LongDocResult] = []
        for carry in modes:
            docs = eval_documents(cfg, paths, long_docs)
            results.append(evaluate_documents(model, docs, cfg.model.seq_len, device, carry_state=carry,
                                              max_windows=max_windows))
        print(format_long_docs(results))
        report["long_documents"] = [{"carry_state": r.carry_state, "documents": r.documents, "loss": r.loss,
                                     "window": r.window, "window_loss": r.window_loss,
                                     "window_tokens": r.window_tokens} for r in results]
    if json_out:
        atomic_write_json(json_out, report)
    return report
