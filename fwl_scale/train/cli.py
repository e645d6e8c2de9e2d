"""`fwl train`, `fwl eval`, `fwl params`.

    fwl train [CONFIG] [key.sub=value ...] [--no-resume | --resume-from CKPT]
    fwl eval CONFIG CKPT [key.sub=value ...] [--batches N] [--long-docs N] [--max-windows W] [--json FILE]
    fwl eval CONFIG CKPT --out DIR [--docs FILE...] [--methods ...] [--dynamic rms|sgd] ...
    fwl eval --compare RESULT_DIR... --out DIR
    fwl params CONFIG [key.sub=value ...]
    fwl ckpt convert CKPT OUT_RUN_DIR          (layout-free; resume it in any layout with --resume-from)
    fwl ckpt consolidate CKPT OUT.safetensors [--dtype float32|bfloat16]

Exit status of `fwl train`: 0 done; 75 (EXIT_REQUEUE) stopped on SIGUSR1/SIGTERM/stop file after saving a
checkpoint (requeue me); 2 bad input (config, checkpoint, data); 3 training failed (e.g. loss not finite).
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fwl_scale.config import Config, ConfigError, load_config

# The commands import torch, DeepSpeed and the model inside their functions: `fwl` builds every parser at
# start, `fwl --help` should not load them, and `fwl train` installs its stop handler first.
EXIT_TRAINING_FAILED = 3


def _split(args: list[str], need_config: bool) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the config file; the rest are dotted overrides."""
    config, overrides = None, []
    for a in args:
        if "=" not in a and config is None and not overrides:
            config = a
        elif "=" in a:
            overrides.append(a)
        else:
            raise ConfigError(f"unexpected argument {a!r}: overrides look like key.sub=value")
    if need_config and config is None:
        raise ConfigError("a config file is needed (e.g. configs/tiny.yaml)")
    return config, overrides


def _load(args: list[str], need_config: bool) -> Config:
    config, overrides = _split(args, need_config)
    return load_config(config, overrides)


def cmd_train(ns: argparse.Namespace) -> int:
    # First thing, before torch and DeepSpeed are imported: a SIGUSR1/SIGTERM during start-up (imports, data
    # preparation, engine set-up — minutes at scale) is recorded, and the trainer stops with a checkpoint
    # at its first step boundary, instead of the default action killing the process.
    from fwl_scale.train.signals import StopRequest

    stop = StopRequest().install()
    try:
        from fwl_scale.train.loop import TrainingError, train  # heavy: see EXIT_TRAINING_FAILED's comment

        cfg = _load(ns.args, need_config=False)
        try:
            code = train(cfg, resume=not ns.no_resume, resume_from=ns.resume_from, stop=stop)
        except TrainingError as e:
            print(f"fwl train: error: {e}", file=sys.stderr)
            code = EXIT_TRAINING_FAILED
    except ConfigError as e:
        _leave_after_error(e)
    finally:
        stop.uninstall()
    _shutdown()
    return code


def _shutdown(after_error: bool = False) -> None:
    """Destroys the process group. After an error another rank may still be inside a collective: gloo's
    destroy is local, NCCL's must be collective and could hang there, so an NCCL group is left to the
    process exit."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_initialized():
        return
    if after_error and torch.distributed.get_backend() != "gloo":
        return
    torch.distributed.destroy_process_group()


def _leave_after_error(e: ConfigError) -> NoReturn:
    """A rank of a launch with an error for the user leaves with exit 2 without the interpreter's teardown,
    where gloo's threads now and then abort the process (SIGABRT, "terminate called without an active
    exception"; pytorch/pytorch#190489), which would hide the exit status from the launcher. In one process
    (also `fwl` called in-process, as the tests do) the error goes up to `fwl`'s own handler."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        raise e
    from fwl_scale.parallel.spawned import exit_spawned_rank  # fwl_scale.parallel imports torch: see EXIT_TRAINING_FAILED's comment

    print(f"fwl: error: {e}", file=sys.stderr)
    _shutdown(after_error=True)
    exit_spawned_rank(2)


def cmd_eval(ns: argparse.Namespace) -> int:
    if ns.compare:
        from fwl_scale.eval.compare import compare_runs  # heavy (matplotlib): see EXIT_TRAINING_FAILED's comment

        if ns.out is None:
            raise ConfigError("--compare: give --out DIR for the table, the JSON and the plots")
        if ns.config is not None:
            raise ConfigError(f"--compare takes results directories only, not {ns.config!r} before it")
        compare_runs(ns.compare, ns.out)
        return 0
    if ns.config is None or ns.checkpoint is None:
        raise ConfigError("fwl eval: give CONFIG and CHECKPOINT (or --compare RESULT_DIR ...)")
    cfg = _load([ns.config] + ns.overrides, need_config=True)
    if ns.out is None:
        if ns.docs:
            raise ConfigError("--docs: give --out DIR for the results (and the tokenized documents' cache)")
        from fwl_scale.eval.run import run_eval  # heavy: see EXIT_TRAINING_FAILED's comment

        run_eval(cfg, ns.checkpoint, batches=ns.batches, long_docs=ns.long_docs, max_windows=ns.max_windows,
                 json_out=ns.json)
        return 0
    from fwl_scale.eval.docrun import DocEvalOptions, run_document_eval  # heavy: see above
    from fwl_scale.eval.ranks import start_process_group  # (torch)

    opts = DocEvalOptions(out=ns.out, docs=ns.docs, max_docs=ns.max_docs, max_tokens=ns.max_tokens,
                          methods=ns.methods.split(",") if ns.methods else None, dynamic_variant=ns.dynamic,
                          dynamic_params=ns.dynamic_params, dynamic_segment=ns.dynamic_segment,
                          tune_docs=ns.tune_docs, tune_tokens=ns.tune_tokens,
                          stat_segments=ns.stat_segments)
    if ns.dynamic_lr:
        opts.lrs = [float(x) for x in ns.dynamic_lr.split(",")]
    if ns.dynamic_decay:
        opts.decays = [float(x) for x in ns.dynamic_decay.split(",")]
    start_process_group()
    try:
        run_document_eval(cfg, ns.checkpoint, opts)
    except (ValueError, ConfigError) as e:  # bad options or documents found once the checkpoint and data are read
        _leave_after_error(e if isinstance(e, ConfigError) else ConfigError(str(e)))
    finally:
        _shutdown()
    return 0


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_params(ns: argparse.Namespace) -> int:
    from fwl_scale.model import build_model  # heavy: see EXIT_TRAINING_FAILED's comment
    from fwl_scale.model.flops import train_flops_per_token  # (torch)

    cfg = _load(ns.args, need_config=True)
    # The meta device: shapes without memory, so the 13B config counts in a second.
    model = build_model(cfg.model, device="meta")
    counts = model.param_counts()
    flops = train_flops_per_token(cfg.model)
    print(f"{cfg.name}: parameters")
    for key in ("body", "fwl", "embeddings", "total"):
        print(f"  {key:<11}{counts[key]:>16,}  ({_fmt(counts[key])})")
    print(f"  training FLOPs per token: {flops.total:.4g} (body {flops.body:.4g}, "
          f"{'FWL' if cfg.model.fwl.enabled else 'unembedding'} {flops.head:.4g})")
    return 0


def cmd_ckpt_convert(ns: argparse.Namespace) -> int:
    from fwl_scale.train.checkpoint_convert import convert_checkpoint  # heavy: see EXIT_TRAINING_FAILED's comment

    ref = convert_checkpoint(ns.checkpoint, ns.out_dir)
    print(f"converted {ns.checkpoint} (step {ref.step}) into the layout-free checkpoint {ref.path}; "
          f"resume it in any layout with: fwl train CONFIG --resume-from {ns.out_dir}")
    return 0


def cmd_ckpt_consolidate(ns: argparse.Namespace) -> int:
    from fwl_scale.train.checkpoint_convert import consolidate  # heavy: see EXIT_TRAINING_FAILED's comment

    path = consolidate(ns.checkpoint, ns.out_file, dtype=ns.dtype)
    print(f"wrote {path}: the model's weights ({ns.dtype}) under the single-process parameter names")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (DeepSpeed; resumes from out_dir automatically)",
                       description="Train with DeepSpeed, one process or many (torchrun/srun set RANK etc.). "
                                   "Exit 75 after a stop request (SIGUSR1/SIGTERM) with a checkpoint saved.")
    p.add_argument("args", nargs="*", metavar="CONFIG_OR_OVERRIDE",
                   help="a YAML config (default: the built-in tiny config), then key.sub=value overrides")
    p.add_argument("--no-resume", action="store_true",
                   help="do not resume from out_dir's latest checkpoint (refused if out_dir has checkpoints)")
    p.add_argument("--resume-from", metavar="CKPT", default=None,
                   help="start from this checkpoint (run dir, its checkpoints/ dir or a step_* dir)")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="perplexity, loss by position, FWL vs dynamic evaluation on any documents",
                       description="Without --out: validation perplexity and loss by position (and --long-docs). "
                                   "With --out DIR: every method (plain / slow_head, fwl_reset, fwl_carried, "
                                   "dynamic) on the same documents (--docs FILE..., else the validation split), "
                                   "with breakdowns by position, training frequency and repetition, and cost. "
                                   "--compare RESULT_DIR...: one table, JSON and plots of such results.")
    e.add_argument("config", nargs="?")
    e.add_argument("checkpoint", nargs="?", help="a run dir, its checkpoints/ dir or a step_* dir")
    e.add_argument("overrides", nargs="*", metavar="key.sub=value")
    e.add_argument("--batches", type=int, default=None, help="validation batches (default train.eval_batches)")
    e.add_argument("--long-docs", type=int, default=0, metavar="N",
                   help="also evaluate N whole validation documents in consecutive windows of model.seq_len")
    e.add_argument("--max-windows", type=int, default=None, help="windows per document at most")
    e.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="results directory of the method comparison (results.json, report.md, cache/)")
    e.add_argument("--docs", nargs="+", default=None, metavar="FILE",
                   help="documents to evaluate: .txt/.md (one document), .jsonl[.xz/.gz/.bz2], .parquet")
    e.add_argument("--max-docs", type=int, default=None, help="evaluate at most this many documents")
    e.add_argument("--max-tokens", type=int, default=None, help="the first N predicted tokens of each document")
    e.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    e.add_argument("--dynamic", default="rms", choices=["rms", "sgd"], help="dynamic evaluation variant")
    e.add_argument("--dynamic-params", default="all", choices=["all", "head", "last"],
                   help="parameters dynamic evaluation updates")
    e.add_argument("--dynamic-segment", type=int, default=None, metavar="N",
                   help="dynamic evaluation steps after every N tokens (default model.seq_len; shorter segments "
                        "see their window's earlier tokens through a key/value cache)")
    e.add_argument("--dynamic-lr", default=None, help="comma-separated learning-rate grid")
    e.add_argument("--dynamic-decay", default=None, help="comma-separated decay grid")
    e.add_argument("--tune-docs", type=int, default=1, help="validation documents to choose lr and decay on")
    e.add_argument("--tune-tokens", type=int, default=4096, help="tokens of each tuning document")
    e.add_argument("--stat-segments", type=int, default=32,
                   help="training segments for the rms variant's mean squared gradients")
    e.add_argument("--compare", nargs="+", default=None, metavar="RESULT_DIR",
                   help="compare the results directories (of --out runs) into --out")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("ckpt", help="convert a checkpoint to another layout, or consolidate its weights")
    csub = c.add_subparsers(dest="ckpt_command", required=True)
    cv = csub.add_parser("convert", help="a layout-free checkpoint any layout (tp, pp, dp, ZeRO, bf16) resumes from",
                         description="Reads a checkpoint of any layout (starting as many local CPU processes as "
                                     "it was written by, unless run by a launcher with that many) and writes a "
                                     "layout-free checkpoint into a new run directory: full weights and optimizer "
                                     "state, schedule, data position. Resume with fwl train --resume-from OUT_DIR.")
    cv.add_argument("checkpoint", help="a run dir, its checkpoints/ dir or a step_* dir")
    cv.add_argument("out_dir", help="a new run directory for the converted checkpoint")
    cv.set_defaults(func=cmd_ckpt_convert)
    cs = csub.add_parser("consolidate", help="one unsharded safetensors file of the model's weights")
    cs.add_argument("checkpoint", help="a run dir, its checkpoints/ dir or a step_* dir")
    cs.add_argument("out_file", help="the .safetensors file to write")
    cs.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cs.set_defaults(func=cmd_ckpt_consolidate)

    q = sub.add_parser("params", help="parameter count (body, FWL, embeddings, total) on the meta device")
    q.add_argument("args", nargs="+", metavar="CONFIG_OR_OVERRIDE")
    q.set_defaults(func=cmd_params)
