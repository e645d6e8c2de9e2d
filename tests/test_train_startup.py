"""A stop signal during `fwl train`'s start-up (imports, data preparation, engine set-up) is not fatal: the
handler is installed before any heavy import, the request is kept, and the trainer stops at its first step
boundary with a checkpoint and exit 75, without training a step."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from fwl_scale.checkpoint.native import find_latest
from fwl_scale.train.signals import EXIT_REQUEUE
from tests.train_support import REPO, fwl_command, fwl_env, records, tiny_overrides, need_corpus


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: the SigCgt mask in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except FileNotFoundError:
        pass
    return False


def test_sigusr1_during_startup_stops_at_the_first_boundary(tmp_path):
    need_corpus()
    out = tmp_path / "run"
    proc = subprocess.Popen(fwl_command("train", *tiny_overrides(out)), cwd=REPO, env=fwl_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not _catches(proc.pid, signal.SIGUSR1):
        assert proc.poll() is None and time.time() < deadline, "fwl train never installed its SIGUSR1 handler"
        time.sleep(0.005)
    proc.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, log[-3000:]
    assert records(out, "train") == []  # no step was trained
    stop = records(out, "stop")[-1]
    assert stop["reason"] == "SIGUSR1" and stop["step"] == 0
    assert find_latest(out / "checkpoints").step == 0


# Runs `fwl train` with the trainer module replaced by a probe: when the trainer is entered (everything
# before it is light: argument parsing, the YAML config), the stop handler must already be installed,
# and torch not imported yet (the probe stands in for the module that imports it).
_PROBE = """
import signal, sys, types
probe = types.ModuleType("fwl_scale.train.loop")
class TrainingError(RuntimeError):
    pass
def train(cfg, resume=True, resume_from=None, stop=None):
    handler = getattr(signal.getsignal(signal.SIGUSR1), "__self__", None)
    print("PROBE", type(handler).__name__, handler is stop, "torch" in sys.modules, flush=True)
    return 0
probe.TrainingError, probe.train = TrainingError, train
sys.modules["fwl_scale.train.loop"] = probe
from fwl_scale.cli import main
sys.exit(main(["train", "train.wandb.enabled=false"]))
"""


def test_stop_handler_is_installed_before_any_heavy_import():
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=fwl_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PROBE StopRequest True False" in proc.stdout, proc.stdout
