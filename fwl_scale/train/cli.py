"""`fwl train`.

    fwl train [CONFIG] [key.sub=value ...] [--no-resume | --resume-from CKPT]

Exit status of `fwl train`: 0 done; 75 (EXIT_REQUEUE) stopped on SIGUSR1/SIGTERM/stop file after saving a
checkpoint (requeue me); 2 bad input (config, checkpoint, data); 3 training failed (e.g. loss not finite).
"""
from __future__ import annotations

import argparse
import sys

from fwl_scale.cli_support import leave_after_error, load_config_args, shutdown_process_group
from fwl_scale.config import ConfigError

# The command imports torch, DeepSpeed and the model inside its function: `fwl` builds every parser at
# start, `fwl --help` should not load them, and `fwl train` installs its stop handler first.
EXIT_TRAINING_FAILED = 3


def cmd_train(ns: argparse.Namespace) -> int:
    # First thing, before torch and DeepSpeed are imported: a SIGUSR1/SIGTERM during start-up (imports, data
    # preparation, engine set-up — minutes at scale) is recorded, and the trainer stops with a checkpoint
    # at its first step boundary, instead of the default action killing the process.
    from fwl_scale.train.signals import StopRequest

    stop = StopRequest().install()
    try:
        from fwl_scale.train.loop import TrainingError, train  # heavy: see EXIT_TRAINING_FAILED's comment

        cfg = load_config_args(ns.args, need_config=False)
        try:
            code = train(cfg, resume=not ns.no_resume, resume_from=ns.resume_from, stop=stop)
        except TrainingError as e:
            print(f"fwl train: error: {e}", file=sys.stderr)
            code = EXIT_TRAINING_FAILED
    except ConfigError as e:
        leave_after_error(e)
    finally:
        stop.uninstall()
    shutdown_process_group()
    return code


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

