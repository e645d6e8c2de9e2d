"""Where a study keeps its files under out_dir, and the one place it writes them (atomically):

    runs/<run>/            the run's train.out_dir (checkpoints, metrics.jsonl)
    logs/<run>.log         the output of its training and evaluations (appended across attempts)
    evals/<run>.json       `fwl eval --json` of the run; <run>.slow.json with the step sizes at zero;
                           <run>.long.json the streamed long documents (spec key long_docs)
    rulers/<ruler>/<run>/  `fwl eval --out` of the run on the ruler's documents (spec key rulers): results.json,
                           report.md, cache/ (`fwl eval --compare OUT/rulers/<ruler>/*` compares the runs)
    results/<run>.json     the run's result: written once it is trained and evaluated (a run with one is never
                           trained again); long_docs and each ruler are added to it as they are measured
    failed/<run>.json      why the last attempt failed (removed when the run, or the measurement it failed
                           in, succeeds)
    data.lock              serializes data preparation between the tasks of a job array
    study.md study.json loss_by_position.png long_docs.png    the collection
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fwl_scale.atomic import atomic_write_bytes
from fwl_scale.study.spec import Run, StudyError, StudySpec


def log_path(spec: StudySpec, run: Run) -> Path:
    return spec.out_dir / "logs" / f"{run.name}.log"


def eval_path(spec: StudySpec, run: Run, slow: bool = False, long: bool = False) -> Path:
    return spec.out_dir / "evals" / f"{run.name}{'.slow' if slow else ''}{'.long' if long else ''}.json"


def ruler_dir(spec: StudySpec, run: Run, ruler: str) -> Path:
    return spec.out_dir / "rulers" / ruler / run.name


def result_path(spec: StudySpec, run: Run) -> Path:
    return result_file(spec.out_dir, run.name)


def result_file(out_dir: Path, name: str) -> Path:
    return out_dir / "results" / f"{name}.json"


def failure_path(spec: StudySpec, run: Run) -> Path:
    return spec.out_dir / "failed" / f"{run.name}.json"


def write_bytes(path: Path, data: bytes) -> None:
    """Every file the study writes goes through here: a reader never sees a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(path: Path) -> Any | None:
    """The file's JSON, or None if it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not valid JSON ({e}); move it away to let the study write it anew") from None
