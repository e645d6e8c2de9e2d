"""Signal points: named places where a test stops, kills or holds a process, never by racing it with sleeps.

`signal_point(name)` marks such a place (a step boundary, each write of a checkpoint or a shard build), and
$FWL_TEST_SIGNAL="<name>@<k>:<SIGNAL>" makes the process send itself SIGNAL the k-th time it gets there
(SIGUSR1: a stop request seen at that very boundary; SIGKILL: a crash). $FWL_TEST_HOLD="<name>@<k>:<file>"
makes it wait there instead, the k-th time, after creating <file>.reached, until <file> exists or a stop
signal arrives (`note_stop_signal`): a test that drives a job from outside (Slurm) signals or kills a
process that is known to be at that point, however slow the delivery. Unset, a point costs two lookups.

On the ground floor beside atomic.py: the data shards, the checkpoint writer and the trainer all mark
points, and none of them may import another's floor for it.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

TEST_SIGNAL_ENV = "FWL_TEST_SIGNAL"
TEST_HOLD_ENV = "FWL_TEST_HOLD"

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
_reached: dict[str, int] = {}
_stop_signal_seen = threading.Event()  # ends a test hold


def note_stop_signal() -> None:
    """A stop signal arrived (called from the stop handler): a test hold waiting at a point ends."""
    _stop_signal_seen.set()


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
