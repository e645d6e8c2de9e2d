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

Tests stop or kill a process at a chosen place, never by racing it with sleeps: `signal_point(name)`
marks such a place (a step boundary, each write of a checkpoint or a shard build), and
$FWL_TEST_SIGNAL="<name>@<k>:<SIGNAL>" makes the process send itself SIGNAL the k-th time it gets there
(SIGUSR1: a stop request seen at that very boundary; SIGKILL: a crash). $FWL_TEST_HOLD="<name>@<k>:<file>"
makes it wait there instead, the k-th time, after creating <file>.reached, until <file> exists or a stop
signal arrives: a test that drives a job from outside (Slurm) signals or kills a process that is known to
be at that point, however slow the delivery. Unset, a point costs two lookups.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

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
TEST_SIGNAL_ENV = "FWL_TEST_SIGNAL"
TEST_HOLD_ENV = "FWL_TEST_HOLD"

# The named places where a test may signal the process, with what has been written when it is reached.
SIGNAL_POINTS = {
    # The trainer asks once before step 1, then at the end of each step: the k-th time is after step k - 1.
    "step": "the trainer asking whether this rank was asked to stop, before the collective decision",
    "shard_tar": "a shard's tar renamed into place, its sidecar not yet written",
    "ckpt_data": "a checkpoint's model/optimizer files (and carried state) written, no marker",
    "ckpt_marker": "a checkpoint's marker written, the latest pointer not yet moved",
    "ckpt_pointer": "the latest pointer moved, older checkpoints not yet pruned",
}
_reached: dict[str, int] = {}
_stop_signal_seen = threading.Event()  # set by StopRequest's handler; ends a test hold


def stop_file_path(out_dir: Path) -> Path:
    """$FWL_STOP_FILE if set (a launcher that does not read our config), else <out_dir>/STOP."""
    env = os.environ.get(STOP_FILE_ENV)
    return Path(env) if env else Path(out_dir) / STOP_FILE_NAME


def _parse(env: str, spec: str, what: str) -> tuple[str, int, str]:
    """"<name>@<k>:<what>" -> (name, k, what); a malformed value is an error naming the variable."""
    try:
        where, arg = spec.rsplit(":", 1) if env == TEST_SIGNAL_ENV else spec.split(":", 1)
        name, k = where.rsplit("@", 1)
        count = int(k)
    except ValueError:
        raise ValueError(f"${env}={spec!r}: expected <point>@<k>:<{what}>") from None
    if name not in SIGNAL_POINTS or count < 1 or not arg:
        raise ValueError(f"${env}={spec!r}: the point is one of {sorted(SIGNAL_POINTS)}, k >= 1, then :<{what}>")
    return name, count, arg


def parse_test_signal(spec: str) -> tuple[str, int, signal.Signals]:
    name, count, signame = _parse(TEST_SIGNAL_ENV, spec, "SIGNAL")
    if signame not in signal.Signals.__members__:
        raise ValueError(f"${TEST_SIGNAL_ENV}={spec!r}: {signame} is not a signal name (e.g. SIGUSR1)")
    return name, count, signal.Signals[signame]


def signal_point(name: str) -> None:
    """A place where a test may signal or hold this process ($FWL_TEST_SIGNAL, $FWL_TEST_HOLD; see the
    module docstring)."""
    spec, hold = os.environ.get(TEST_SIGNAL_ENV), os.environ.get(TEST_HOLD_ENV)
    if not spec and not hold:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if hold:
        want, k, path = _parse(TEST_HOLD_ENV, hold, "file")
        if name == want and _reached[name] == k:
            Path(path + ".reached").touch()
            while not Path(path).exists() and not _stop_signal_seen.is_set():
                time.sleep(0.05)  # a signal is handled (and recorded) during the sleep
    if spec:
        want, k, sig = parse_test_signal(spec)
        if name == want and _reached[name] == k:
            # Sent to ourselves from the main thread: Linux delivers it to this thread and CPython runs
            # the Python handler before os.kill returns, so a stop request is seen at this very point.
            os.kill(os.getpid(), sig)


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
        _stop_signal_seen.set()
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
