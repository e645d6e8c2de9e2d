"""Stop requests: SIGUSR1 / SIGTERM (or a stop file) -> every rank stops at the same step boundary,
saves a checkpoint and exits with EXIT_REQUEUE.

A signal handler only sets a local flag; it never raises inside whatever the process was doing (a
collective, a checkpoint write). At every step boundary the trainer all-reduces the flag (max), so a
signal delivered to one rank only (or to different ranks at different moments) still stops all ranks
after the same step. Slurm sends SIGUSR1 ahead of the time limit when asked (`--signal`) and SIGTERM on
preemption or scancel; both lead to the same path. A stop file (`<out_dir>/STOP`) does the same for
launch setups in which the signal reaches a wrapper script rather than the ranks (e.g. a batch-script
trap that touches the file; the path can be set with $FWL_STOP_FILE); the trainer removes it once the
checkpoint is saved, so a requeued job does not stop again at once.

Tests stop or kill a process at a chosen place through fwl_scale/signal_points.py; the trainer's step
boundary is the point "step".
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fwl_scale.signal_points import note_stop_signal, signal_point

if TYPE_CHECKING:
    import torch

# torch is imported only where it is used: `fwl train` installs the handlers before any heavy import, so
# that a signal during start-up (imports, data preparation, engine set-up) is recorded, not fatal.

# Exit status meaning "stopped on request, checkpoint saved, run me again": EX_TEMPFAIL from
# sysexits.h. The Slurm launchers requeue the job when the trainer exits with it.
EXIT_REQUEUE = 75

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_FILE_NAME = "STOP"
STOP_FILE_ENV = "FWL_STOP_FILE"


def stop_file_path(out_dir: Path) -> Path:
    """$FWL_STOP_FILE if set (a launcher that does not read our config), else <out_dir>/STOP."""
    env = os.environ.get(STOP_FILE_ENV)
    return Path(env) if env else Path(out_dir) / STOP_FILE_NAME


class StopRequest:
    """Catches the stop signals while installed (a context manager) and answers, collectively,
    whether the run should stop now."""

    def __init__(self, stop_file: Path | None = None, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.stop_file = stop_file
        self.signals = signals
        self.local_reason: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only record; the step loop acts at the next step boundary.
        note_stop_signal()
        if self.local_reason is None:
            self.local_reason = signal.Signals(signum).name

    def install(self) -> "StopRequest":
        # Signal handlers can only be set from the main thread (an embedding application may run us
        # elsewhere; then only the stop file works).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def request(self, reason: str) -> None:
        """Asks for a stop from inside the process (what a signal does)."""
        if self.local_reason is None:
            self.local_reason = reason

    def local(self) -> bool:
        signal_point("step")
        if self.local_reason is None and self.stop_file is not None and self.stop_file.exists():
            self.local_reason = f"stop file {self.stop_file}"
        return self.local_reason is not None

    def should_stop(self, device: "torch.device") -> bool:
        """Collective: True on every rank if any rank was asked to stop. Call it at the same point on
        every rank (each step boundary)."""
        import torch

        flag = torch.tensor([1.0 if self.local() else 0.0], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def clear_stop_file(self) -> None:
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)
