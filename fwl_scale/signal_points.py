"""Signal points: named places where a test stops, kills or holds a process, never by racing it with sleeps.

`signal_point(name)` marks such a place (a step boundary, each write of a checkpoint or a shard build), and
$FWL_TEST_SIGNAL="<name>@<k>:<SIGNAL>" makes the process send itself SIGNAL the k-th time it gets there
(SIGUSR1: a stop request seen at that very boundary; SIGKILL: a crash). $FWL_TEST_HOLD="<name>@<k>:<file>"
makes it wait there instead, the k-th time, after creating <file>.reached, until <file> exists or a stop
signal arrives (`note_stop_signal`): a test that drives a job from outside (Slurm) signals or kills a
process that is known to be at that point, however slow the delivery. Unset, a point costs two lookups.

A fault point is a place where a write may fail: $FWL_TEST_FAULT="<name>@<k>:<ERRNO>" makes the k-th
write there fail with OSError(ERRNO) part-way, as it would on a full disk (ENOSPC), over a quota (EDQUOT)
or on a failing device (EIO): `fault_due(name)` says so, and the writer writes through a `FailingFile`.
A full disk at a chosen file, without filling one.

On the ground floor beside atomic.py: the data shards, the checkpoint writer and the trainer all mark
points, and none of them may import another's floor for it.
"""
from __future__ import annotations

import errno
import io
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

TEST_SIGNAL_ENV = "FWL_TEST_SIGNAL"
TEST_HOLD_ENV = "FWL_TEST_HOLD"
TEST_FAULT_ENV = "FWL_TEST_FAULT"

# The named places where a test may signal the process, with what has been written when it is reached.
SIGNAL_POINTS = {
    # The trainer asks once before step 1, then at the end of each step: the k-th time is after step k - 1.
    "data_ready": "rank 0's tokenizer and shards prepared (or found), the other ranks not yet told",
    "step": "the trainer asking whether this rank was asked to stop, before the collective decision",
    "shard_tar": "a shard's tar renamed into place, its sidecar not yet written",
    "ckpt_data": "a checkpoint's model/optimizer files (and carried state) written, no marker",
    "ckpt_marker": "a checkpoint's marker written, the latest pointer not yet moved",
    "ckpt_pointer": "the latest pointer moved, older checkpoints not yet pruned",
}
# The named places where a test may make a write fail ($FWL_TEST_FAULT), with what has been written then.
FAULT_POINTS = {
    "ckpt_write": "one of DeepSpeed's files of a checkpoint (the k-th of this process), the files before it "
                  "written",
}
_reached: dict[str, int] = {}
_faulted: dict[str, int] = {}
_stop_signal_seen = threading.Event()  # ends a test hold


def note_stop_signal() -> None:
    """A stop signal arrived (called from the stop handler): a test hold waiting at a point ends."""
    _stop_signal_seen.set()


def _parse(env: str, spec: str, what: str) -> tuple[str, int, str]:
    """"<name>@<k>:<what>" -> (name, k, what); a malformed value is an error naming the variable."""
    try:
        where, arg = spec.split(":", 1) if env == TEST_HOLD_ENV else spec.rsplit(":", 1)
        name, k = where.rsplit("@", 1)
        count = int(k)
    except ValueError:
        raise ValueError(f"${env}={spec!r}: expected <point>@<k>:<{what}>") from None
    points = FAULT_POINTS if env == TEST_FAULT_ENV else SIGNAL_POINTS
    if name not in points or count < 1 or not arg:
        raise ValueError(f"${env}={spec!r}: the point is one of {sorted(points)}, k >= 1, then :<{what}>")
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


def parse_test_fault(spec: str) -> tuple[str, int, int]:
    name, count, errname = _parse(TEST_FAULT_ENV, spec, "ERRNO")
    code = getattr(errno, errname, None)
    if not errname.startswith("E") or not isinstance(code, int):
        raise ValueError(f"${TEST_FAULT_ENV}={spec!r}: {errname} is not an errno name (e.g. ENOSPC)")
    return name, count, code


def fault_due(name: str) -> int | None:
    """The errno with which a test wants this write at fault point `name` to fail ($FWL_TEST_FAULT: the
    k-th time the point is reached), else None. Unset, it costs one lookup."""
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec:
        return None
    _faulted[name] = _faulted.get(name, 0) + 1
    want, k, code = parse_test_fault(spec)
    return code if name == want and _faulted[name] == k else None


class FailingFile:
    """A binary file whose writes fail as on a full disk: the first write goes through, every later one
    raises OSError(code), and a partly written file is left behind. It has no file descriptor, so a
    writer (torch.save) goes through `write`."""

    def __init__(self, f: BinaryIO, code: int):
        self._f, self._code, self._writes = f, code, 0

    def write(self, data: bytes) -> int:
        self._writes += 1
        if self._writes > 1:
            raise OSError(self._code, os.strerror(self._code))
        return self._f.write(data)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)
