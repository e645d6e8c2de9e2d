"""`fwl data tokenizer|shards|verify` through the real entry point: outputs, bad input with a non-zero
exit and a clear message, nothing overwritten, and a build killed with SIGKILL that resumes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fwl_scale.cli import main
from fwl_scale.data import Manifest
from fwl_scale.data.shard_index import ShardIndex
from fwl_scale.signal_points import TEST_SIGNAL_ENV
from tests.corpus import read_records

REPO = Path(__file__).resolve().parents[1]


def corpus_records(n: int, cut: int) -> list[dict]:
    return [{**r, "text": r["text"][:cut]} for r in read_records("train")[:n]]


def fwl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "fwl_scale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    src = tmp / "slice.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in corpus_records(8, cut=6000)))
    cfg = tmp / "c.yaml"
    cfg.write_text(f"model:\n  vocab_size: 400\ndata:\n  train: [{src}]\n  root: {tmp / 'root'}\n"
                   f"  workers: 1\n  shard_bytes: 8192\n  valid_fraction: 0.25\n")
    return tmp, src, cfg


def test_tokenizer_command_standalone_and_no_overwrite(small):
    tmp, src, cfg = small
    out = tmp / "tok.model"
    r = fwl("data", "tokenizer", "model.vocab_size=420", "data.tokenizer_type=unigram", "--input", str(src),
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in r.stdout and "420 pieces (model embedding padded to 512)" in r.stdout
    assert json.loads(out.with_suffix(".json").read_text())["checksum"] == digest
    r2 = fwl("data", "tokenizer", "--input", str(src), "--out", str(out))
    assert r2.returncode == 2 and f"--out: {out} already exists; not overwriting" in r2.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def test_shards_and_verify_commands(small, capsys):
    tmp, src, cfg = small
    assert main(["data", "tokenizer", str(cfg)]) == 0
    assert "400 pieces" in capsys.readouterr().out
    assert main(["data", "shards", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "train: " in out and "valid: 2 shards, 2 documents" in out
    assert main(["data", "verify", str(cfg)]) == 0
    said = capsys.readouterr().out
    assert out.count("OK") == 0 and said.count(": OK, ") == 4 and said.count("index.npz: OK, ") == 2
    # A damaged document index (one offset moved) is named; the shards themselves are fine.
    index_path = tmp / "root" / "valid" / "index.npz"
    good = index_path.read_bytes()
    index = ShardIndex.from_bytes(good, "test")
    index.doc_offset[-1] += 512
    index_path.write_bytes(index.to_bytes())
    assert main(["data", "verify", str(cfg)]) == 2
    assert f"{index_path}: doc_offset does not match the shards" in capsys.readouterr().err
    index_path.write_bytes(good)
    # Damage a shard (same size): verify fails with the shard's name and a non-zero exit.
    shard = tmp / "root" / "train" / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:1100] + bytes(b ^ 0xFF for b in data[1100:1140]) + data[1140:])
    assert main(["data", "verify", str(cfg)]) == 2
    assert f"shard {shard}: corrupt: sha256" in capsys.readouterr().err
    shard.write_bytes(data)


def test_bad_input_exits_non_zero_with_a_clear_message(small, tmp_path):
    tmp, src, cfg = small
    r = fwl("data", "shards", str(cfg), f"data.root={tmp_path / 'r'}", f"data.train=[{tmp_path / 'missing.jsonl'}]")
    assert r.returncode == 2 and f"data.train[0]: no such file or directory: {tmp_path / 'missing.jsonl'}" in r.stderr
    assert not (tmp_path / "r").exists()
    r = fwl("data", "shards", str(cfg), "data.shardbytes=5")
    assert r.returncode == 2 and "unknown key data.shardbytes" in r.stderr
    r = fwl("data", "shards", str(cfg), "data.shard_bytes=0")
    assert r.returncode == 2 and "data.shard_bytes: must be > 0" in r.stderr
    (tmp_path / "bin.txt").write_bytes(b"")
    r = fwl("data", "tokenizer", "--input", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "t.model"))
    assert r.returncode == 2 and "bin.txt: no documents (it holds no text)" in r.stderr
    assert not (tmp_path / "t.model").exists()


def test_build_killed_with_sigkill_resumes_to_identical_shards(tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in corpus_records(12, cut=60_000)))
    common = [f"data.train=[{src}]", "model.vocab_size=1024", "data.workers=1", "data.shard_bytes=65536",
              "data.valid_fraction=0.1"]
    assert main(["data", "tokenizer", f"data.root={tmp_path / 'clean'}", *common]) == 0
    tok = tmp_path / "clean" / "tokenizer" / "spm.model"
    common.append(f"data.tokenizer={tok}")
    assert main(["data", "shards", f"data.root={tmp_path / 'clean'}", *common]) == 0
    clean = Manifest.load(tmp_path / "clean" / "train" / "manifest.json")
    assert len(clean.shards) > 4

    # Killed the moment the third shard's tar is in place, before its sidecar (the test hook in
    # fwl_scale/train/signals.py): the worst point, a tar that looks whole but is not marked complete.
    env = {**os.environ, "PYTHONPATH": str(REPO), TEST_SIGNAL_ENV: "shard_tar@3:SIGKILL"}
    root = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-m", "fwl_scale.cli", "data", "shards", f"data.root={root}", *common],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    train = root / "train"
    assert not (train / "manifest.json").exists()
    assert sorted(p.name for p in train.glob("shard-*.json")) == ["shard-000000.json", "shard-000001.json"]
    assert (train / "shard-000002.tar").is_file()
    # Every tar that has a sidecar is complete and matches it.
    for side in train.glob("shard-*.json"):
        entry = json.loads(side.read_text())["shard"]
        assert hashlib.sha256((train / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    r = fwl("data", "shards", f"data.root={root}", *common)
    assert r.returncode == 0, r.stderr
    assert "keeping 2 finished shards" in r.stdout
    resumed = Manifest.load(train / "manifest.json")
    assert [e.sha256 for e in resumed.shards] == [e.sha256 for e in clean.shards]
    assert not list(train.glob("*.tmp*"))
