"""Runs a study's runs, one after another in this process's children: `fwl train` then `fwl eval` (and,
for the FWL arm, `fwl eval` with model.fwl.step_scale=0: the slow head alone), then the run's result;
then the measurements the spec adds (add_measurements): with long_docs, whole validation documents
streamed window after window; with rulers, `fwl eval --out` on each ruler's documents.

A run whose result exists is not trained or evaluated again, only given the measurements its result
lacks (a spec that gained or changed long_docs or a ruler); one whose training directory holds
checkpoints resumes there (the trainer resumes from train.out_dir by itself), and a finished training is
not repeated. A stop signal (SIGUSR1/SIGTERM: a Slurm time limit or preemption) is forwarded to the child
as SIGUSR1, which the trainer answers by saving a checkpoint and exiting 75; the study then exits 75 too
(requeue me).
"""
from __future__ import annotations

import fcntl
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fwl_scale
from fwl_scale.eval.names import RESULTS
from fwl_scale.study import store
from fwl_scale.study.spec import Ruler, Run, StudySpec
from fwl_scale.train.signals import EXIT_REQUEUE

EXIT_FAILED = 1
# Runs are single processes; a study started under a distributed launcher must not hand them its rank.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    # The children run the same fwl_scale as this process, wherever it was imported from.
    home = str(Path(fwl_scale.__file__).resolve().parents[1])
    env["PYTHONPATH"] = home + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Children:
    """Starts one child at a time and forwards a stop signal to it as SIGUSR1."""

    def __init__(self) -> None:
        self.current: subprocess.Popen | None = None
        self.stop_reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.stop_reason is None:
            self.stop_reason = signal.Signals(signum).name
        child = self.current
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGUSR1)

    def __enter__(self) -> "Children":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def call(self, cmd: list[str], log: Path) -> int:
        if self.stop_reason is not None:  # asked to stop between two children: start no other
            return EXIT_REQUEUE
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            self.current = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())
            try:
                return self.current.wait()
            finally:
                self.current = None


def fwl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fwl_scale.cli", *args]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def build_result(spec: StudySpec, run: Run, valid: dict[str, Any], slow: dict[str, Any] | None) -> dict[str, Any]:
    """The run's result from its evaluations, its metrics.jsonl and its checkpoint's step sizes."""
    # torch comes with these imports; --list, --slurm and --collect do without it.
    from fwl_scale.eval.run import load_for_eval
    from fwl_scale.train.metrics import read_metrics
    import torch

    run_dir = spec.run_dir(run)
    metrics = run_dir / "metrics.jsonl"
    train = read_metrics(metrics, "train")
    trained_valid = read_metrics(metrics, "valid")
    step_sizes = None
    if run.arm == "fwl":
        model, _ = load_for_eval(spec.run_config(run), run_dir, torch.device("cpu"))
        step_sizes = model.fwl.step_size_dict()
    return {
        "run": run.name, "index": run.index, "variant": run.variant, "arm": run.arm, "seed": run.seed,
        "config": run.config, "overrides": list(run.overrides), "run_dir": str(run_dir),
        "log": str(store.log_path(spec, run)), "step": valid["step"], "checkpoint": valid["checkpoint"],
        "valid": valid["valid"],
        "slow_head": slow["valid"] if slow is not None else None,
        "step_sizes": step_sizes,
        "tokens_per_s": _mean([r["tokens_per_s"] for r in train if r.get("tokens_per_s") is not None]),
        "trainer_valid": trained_valid[-1] if trained_valid else None,
        "finished_at": time.time(),
    }


def _fail(spec: StudySpec, run: Run, stage: str, detail: str) -> str:
    log = store.log_path(spec, run)
    store.write_json(store.failure_path(spec, run),
                     {"run": run.name, "variant": run.variant, "arm": run.arm, "seed": run.seed, "stage": stage,
                      "detail": detail, "log": str(log), "time": time.time()})
    print(f"fwl study: run {run.name} (variant {run.variant}) failed in {stage}: {detail}; log {log}",
          file=sys.stderr, flush=True)
    return "failed"


def prepare_data(spec: StudySpec, run: Run, children: Children) -> int:
    """`fwl data shards` for the run's config under a lock: runs of a job array start together, and two
    processes must not build the same tokenizer and shards (a finished data root is only checked)."""
    lock = spec.out_dir / "data.lock"
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            return children.call(fwl_cmd("data", "shards", run.config, *spec.train_overrides(run)),
                                 store.log_path(spec, run))
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stream_long_docs(spec: StudySpec, run: Run, children: Children) -> dict[str, Any] | str:
    """The run's loss by window over whole validation documents (state carried and reset): its JSON,
    or the status to return (stopped, failed)."""
    assert spec.long_docs is not None
    path = store.eval_path(spec, run, long=True)
    path.unlink(missing_ok=True)
    rc = children.call(fwl_cmd("eval", run.config, str(spec.run_dir(run)), *spec.train_overrides(run), "--stream",
                               "--windows", str(spec.long_docs["windows"]), "--buckets", "1",
                               "--max-docs", str(spec.long_docs["documents"]), "--json", str(path)),
                       store.log_path(spec, run))
    if children.stop_reason is not None:
        return "stopped"
    if rc != 0:
        return _fail(spec, run, "long documents", f"fwl eval --stream exited with {rc}")
    streamed = store.read_json(path)
    if streamed is None:
        return _fail(spec, run, "long documents", f"fwl eval --stream wrote no {path}")
    return streamed


def ruler_record(report: dict[str, Any], measures: dict[str, list[str]], out: Path) -> dict[str, Any]:
    """What the run's result keeps of `fwl eval --out`'s report: per method the loss, tokens, GFLOPs/token,
    wall s and chosen settings; the documents (the table pairs only runs that scored the same ones)."""
    return {"spec": measures, "out": str(out), "documents": report["documents"],
            "documents_id": report["documents_id"],
            "methods": {m["method"]: {"loss": m["loss"], "tokens": m["tokens"],
                                      "gflops_per_token": m["flops_per_token"] / 1e9, "wall_s": m["wall_s"],
                                      "settings": m.get("dynamic") or m.get("cache")}
                        for m in report["methods"]}}


def measure_ruler(spec: StudySpec, run: Run, ruler: Ruler, children: Children) -> dict[str, Any] | str:
    """`fwl eval --out` of the run on the ruler's documents with its arm's methods: the record its result
    keeps (ruler_record), or the status to return (stopped, failed)."""
    measures = ruler.measures(run.arm)
    assert measures is not None
    out = store.ruler_dir(spec, run, ruler.name)
    path = out / RESULTS
    path.unlink(missing_ok=True)  # never read an earlier attempt's file as this one's
    # --leave-out-tune-docs: an arm that tunes nothing scores the validation documents the other arm's
    # dynamic evaluation or cache scores (they tune on the first), so the two pair document for document.
    rc = children.call(fwl_cmd("eval", run.config, str(spec.run_dir(run)), *spec.train_overrides(run),
                               "--out", str(out), "--methods", ",".join(measures["methods"]),
                               "--leave-out-tune-docs", *ruler.args),
                       store.log_path(spec, run))
    stage = f"ruler {ruler.name}"
    if children.stop_reason is not None:
        return "stopped"
    if rc != 0:
        return _fail(spec, run, stage, f"fwl eval --out exited with {rc}")
    report = store.read_json(path)
    if report is None:
        return _fail(spec, run, stage, f"fwl eval --out wrote no {path}")
    return ruler_record(report, measures, out)


def add_measurements(spec: StudySpec, run: Run, children: Children) -> str:
    """The run's result gains the measurements the spec asks for and it lacks or has with other settings
    (long_docs, each ruler), without training or evaluating it again; each is written as soon as it is
    measured, so that one that fails keeps the others. Returns done, skipped (nothing lacking), failed or
    stopped."""
    path = store.result_path(spec, run)
    result = store.read_json(path)
    added = False
    if spec.long_docs is not None and result.get("long_docs", {}).get("spec") != spec.long_docs:
        print(f"fwl study: run {run.index} {run.name}: long documents", flush=True)
        streamed = stream_long_docs(spec, run, children)
        if isinstance(streamed, str):
            return streamed
        result["long_docs"] = {"spec": spec.long_docs, "modes": streamed}
        store.write_json(path, result)
        added = True
    for ruler in spec.rulers.values():
        measures = ruler.measures(run.arm)
        if measures is None or result.get("rulers", {}).get(ruler.name, {}).get("spec") == measures:
            continue
        print(f"fwl study: run {run.index} {run.name}: ruler {ruler.name} ({', '.join(measures['methods'])})",
              flush=True)
        record = measure_ruler(spec, run, ruler, children)
        if isinstance(record, str):
            return record
        result.setdefault("rulers", {})[ruler.name] = record
        store.write_json(path, result)
        added = True
    store.failure_path(spec, run).unlink(missing_ok=True)  # it has all the spec asks for now
    return "done" if added else "skipped"


def run_one(spec: StudySpec, run: Run, children: Children, concurrent: bool = False) -> str:
    """Trains and evaluates one run; returns done | skipped | failed | stopped. `concurrent`: other
    runs of the study may be starting at the same time (a job array)."""
    if store.result_path(spec, run).is_file():
        return add_measurements(spec, run, children)
    log = store.log_path(spec, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    store.eval_path(spec, run).parent.mkdir(parents=True, exist_ok=True)
    overrides = spec.train_overrides(run)
    if concurrent:
        rc = prepare_data(spec, run, children)
        if children.stop_reason is not None:
            return "stopped"
        if rc != 0:
            return _fail(spec, run, "data", f"fwl data shards exited with {rc}")
    print(f"fwl study: run {run.index} {run.name}: training (log {log})", flush=True)
    rc = children.call(fwl_cmd("train", run.config, *overrides), log)
    if children.stop_reason is not None or rc == EXIT_REQUEUE:
        return "stopped"
    if rc != 0:
        return _fail(spec, run, "train", f"fwl train exited with {rc}")
    batches = ["--batches", str(spec.eval_batches)] if spec.eval_batches else []
    evals: dict[bool, dict[str, Any] | None] = {False: None, True: None}
    for slow in ([False, True] if run.arm == "fwl" else [False]):
        path = store.eval_path(spec, run, slow)
        path.unlink(missing_ok=True)  # never read an earlier attempt's file as this one's
        extra = ["model.fwl.step_scale=0"] if slow else []
        rc = children.call(fwl_cmd("eval", run.config, str(spec.run_dir(run)), *overrides, *extra, *batches,
                                   "--json", str(path)), log)
        if children.stop_reason is not None:
            return "stopped"
        stage = "eval with model.fwl.step_scale=0" if slow else "eval"
        if rc != 0:
            return _fail(spec, run, stage, f"fwl eval exited with {rc}")
        evals[slow] = store.read_json(path)
        if evals[slow] is None:
            return _fail(spec, run, stage, f"fwl eval wrote no {path}")
    valid = evals[False]
    assert valid is not None
    try:
        result = build_result(spec, run, valid, evals[True])
    except Exception as e:  # noqa: BLE001 — a run that cannot be read is one failed run, not a failed study
        return _fail(spec, run, "reading the results", f"{type(e).__name__}: {e}")
    store.write_json(store.result_path(spec, run), result)
    store.failure_path(spec, run).unlink(missing_ok=True)
    ppl = result["valid"]["perplexity"]
    print(f"fwl study: run {run.index} {run.name}: trained and evaluated, val ppl {ppl:.3f}", flush=True)
    # Measured after the result is written: a measurement that fails is tried again alone next time.
    status = add_measurements(spec, run, children)
    return "done" if status == "skipped" else status


def run_runs(spec: StudySpec, runs: list[Run], concurrent: bool = False) -> dict[str, str]:
    """Runs `runs` in order until one is stopped by a signal; returns each attempted run's status."""
    statuses: dict[str, str] = {}
    with Children() as children:
        for run in runs:
            statuses[run.name] = run_one(spec, run, children, concurrent)
            if statuses[run.name] == "stopped":
                print(f"fwl study: stopped ({children.stop_reason or 'the trainer exited 75'}) during {run.name}; "
                      f"its checkpoint is kept, run the study again to resume", flush=True)
                break
    return statuses


def exit_status(statuses: dict[str, str]) -> int:
    if "stopped" in statuses.values():
        return EXIT_REQUEUE
    return EXIT_FAILED if "failed" in statuses.values() else 0
