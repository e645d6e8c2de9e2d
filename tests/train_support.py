"""Shared pieces of the trainer and evaluation tests: a tiny config on real text, the prepared data
(cached under .cache/tests so that it is built once), reading losses back, running `fwl` as a process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from fwl_scale.config import Config, load_config
from tests.corpus import corpus_dir, corpus_name
from tests.distributed import reserved_port

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Tokenizer and shards for the tests, one per corpus; prepare_data is idempotent, so later runs only
    check them."""
    return REPO / ".cache" / "tests" / f"train_data_v512_{corpus_name()}"


def need_corpus() -> None:
    """Makes sure the test corpus is there (built on first use), else skips the calling test."""
    corpus_dir()


def tiny_overrides(out_dir: Path | str, *extra: str) -> list[str]:
    """A model small enough for seconds per run on 2 shared CPU cores, on real text (tests/corpus.py;
    skips the calling test when there is none)."""
    corpus = corpus_dir()
    return [
        "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.seq_len=32", "model.vocab_size=512",
        "model.fwl.chunk_size=16",  # two chunks per window: the mixed-chunk form, state included
        f"data.train=[{corpus / 'train.jsonl.xz'}]", f"data.valid=[{corpus / 'valid.jsonl.xz'}]",
        f"data.root={data_root()}", "data.tokenizer_sample_chars=2000000", "data.loader_workers=0",
        "parallel.micro_batch=4", "train.steps=8", "train.warmup_steps=2", "train.lr=0.003",
        "train.log_every=1", "train.eval_every=1000", "train.save_every=1000", "train.eval_batches=2",
        "train.wandb.enabled=false", f"train.out_dir={out_dir}", *extra,
    ]


def tiny_config(out_dir: Path | str, *extra: str) -> Config:
    return load_config(None, tiny_overrides(out_dir, *extra))


def records(out_dir: Path | str, kind: str) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out.append(r)
    return out


def step_losses(out_dir: Path | str) -> dict[int, float]:
    """Training loss by step (a step logged twice, by a crashed and a resumed attempt, keeps the last)."""
    return {r["step"]: r["loss"] for r in records(out_dir, "train")}


def fwl_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def fwl_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fwl_scale.cli", *args]


def run_fwl(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(fwl_command(*args), cwd=REPO, env=fwl_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def launch_ranks(out_dir: Path | str, *extra: str, world: int = 2, args: tuple[str, ...] = (),
                 rank_env: dict[int, dict[str, str]] | None = None, timeout: float = 600) -> list[tuple[int, str]]:
    """`fwl train` on `world` processes as a launcher starts them (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); waits for all and returns each rank's (exit status, output).
    `rank_env`: more environment for some ranks (a test hook that signals one rank)."""
    overrides = tiny_overrides(out_dir, *extra)
    # Output to files, not pipes: a rank blocked on a full pipe nobody reads would hang the others.
    logs = [tempfile.TemporaryFile("w+") for _ in range(world)]
    procs: list[subprocess.Popen] = []
    try:
        with reserved_port() as port:
            for rank in range(world):
                env = fwl_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(rank_env or {}).get(rank, {}))
                procs.append(subprocess.Popen(fwl_command("train", *overrides, *args), cwd=REPO, env=env,
                                              stdout=logs[rank], stderr=subprocess.STDOUT, text=True))
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        results = []
        for p, log in zip(procs, logs):
            log.seek(0)
            results.append((p.returncode, log.read()))
        return results
    finally:
        for p in procs:  # a rank that hangs is not left behind
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
