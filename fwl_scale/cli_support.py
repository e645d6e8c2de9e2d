"""What every area's `fwl` command shares: a config and its overrides from the command line, and leaving a
launch of several ranks cleanly after an error or at the end.

Torch is looked up in sys.modules, never imported here: `fwl` builds every area's parser at start, and
`fwl --help` or `fwl train`'s stop handler must come before any heavy import.
"""
from __future__ import annotations

import sys
from typing import NoReturn

from fwl_scale.config import Config, ConfigError, load_config


def split_config_args(args: list[str], need_config: bool) -> tuple[str | None, list[str]]:
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


def load_config_args(args: list[str], need_config: bool) -> Config:
    config, overrides = split_config_args(args, need_config)
    return load_config(config, overrides)


def shutdown_process_group(after_error: bool = False) -> None:
    """Destroys the process group. After an error another rank may still be inside a collective: gloo's
    destroy is local, NCCL's must be collective and could hang there, so an NCCL group is left to the
    process exit."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_initialized():
        return
    if after_error and torch.distributed.get_backend() != "gloo":
        return
    torch.distributed.destroy_process_group()


def leave_after_error(e: ConfigError) -> NoReturn:
    """A rank of a launch with an error for the user leaves with exit 2 without the interpreter's teardown,
    where gloo's threads now and then abort the process (SIGABRT, "terminate called without an active
    exception"; pytorch/pytorch#190489), which would hide the exit status from the launcher. In one process
    (also `fwl` called in-process, as the tests do) the error goes up to `fwl`'s own handler."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        raise e
    # Function-level: fwl_scale.parallel imports torch, which a command without a process group never needs.
    from fwl_scale.parallel.spawned import exit_spawned_rank

    print(f"fwl: error: {e}", file=sys.stderr)
    shutdown_process_group(after_error=True)
    exit_spawned_rank(2)
