"""Remote shards: a split served over HTTP (a local server started here, with Range support and injected
failures) or read through a `pipe:` command gives exactly the rows of the local split; transient failures
are retried; a missing, failing or changed shard and an unreachable manifest are errors naming them."""
from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import shutil
import socket
import threading

import pytest
import torch

from fwl_scale.cli import main
from fwl_scale.config import load_config
from fwl_scale.data import DataError, Manifest, TrainLoader, eval_documents, prepare_data, remote, valid_batches
from tests.test_data_loader import M, T, VOCAB, data  # noqa: F401  (data: the shared fixture)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """GET with `Range: bytes=a-b`; server.fail maps a path suffix to how many 503s it still answers."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        for suffix, n in srv.fail.items():
            if self.path.endswith(suffix) and n > 0:
                srv.fail[suffix] = n - 1
                self.send_error(503, "injected")
                return
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404, "no such file")
            return
        with open(path, "rb") as f:
            body = f.read()
        rng = self.headers.get("Range")
        if rng:
            a, b = (int(x) for x in rng.split("=", 1)[1].split("-"))
            total, body = len(body), body[a:b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{total}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def served(data, tmp_path, monkeypatch):
    """A copy of the data root behind http://127.0.0.1:PORT/ (a free port), and its local twin."""
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)  # retries without waiting: no test depends on time
    cfg, paths = data
    root = tmp_path / "served"
    shutil.copytree(paths.root, root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.requests, server.fail = [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield cfg, paths, root, server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def remote_cfg(cfg, paths, tmp_path, train: str, valid: str | None = None):
    over = [f"data.root={tmp_path / 'local'}", f"data.train=[{train}]", f"data.valid=[{valid or ''}]",
            f"data.tokenizer={paths.tokenizer}", f"model.vocab_size={VOCAB}", f"model.seq_len={T}",
            f"parallel.micro_batch={M}", "data.loader_workers=0", "data.valid_fraction=0"]
    return load_config(None, over)


def same_rows(cfg_a, paths_a, cfg_b, paths_b, dp: int = 2, steps: int = 25) -> None:
    for r in range(dp):
        a, b = TrainLoader(cfg_a, paths_a, r, dp), TrainLoader(cfg_b, paths_b, r, dp)
        for _ in range(steps):
            x, y = a.next_batch(), b.next_batch()
            assert all(torch.equal(x[k], y[k]) for k in x)
        assert a.state_dict() == b.state_dict()


def test_http_and_pipe_splits_give_the_local_rows(served, tmp_path, capsys):
    cfg, paths, root, server, url = served
    c = remote_cfg(cfg, paths, tmp_path, f"{url}/train/manifest.json", f"{url}/valid/manifest.json")
    rp = prepare_data(c, log=lambda s: None)
    assert rp.train_manifest == f"{url}/train/manifest.json" and not (tmp_path / "local" / "train").exists()
    same_rows(cfg, paths, c, rp)
    # Reads are byte ranges (the rank's blocks), never whole shards.
    shard_gets = [(p, r) for p, r in server.requests if p.endswith(".tar")]
    assert shard_gets and all(r is not None for _, r in shard_gets)
    va, vb = valid_batches(cfg, paths, None, 1, 2), valid_batches(c, rp, None, 1, 2)
    assert len(va) == len(vb) and all(torch.equal(x[k], y[k]) for x, y in zip(va, vb) for k in x)
    assert [d.tolist() for d in eval_documents(cfg, paths)] == [d.tolist() for d in eval_documents(c, rp)]
    # `fwl data shards` accepts the URL form: checks and summarises, builds nothing.
    assert main(["data", "shards", *[f"{k}={v}" for k, v in [
        ("data.root", tmp_path / "local"), ("data.train", f"[{url}/train/manifest.json]"), ("data.valid", "[]"),
        ("data.tokenizer", paths.tokenizer), ("model.vocab_size", VOCAB)]]]) == 0
    assert f"-> {url}/train/manifest.json" in capsys.readouterr().out
    # `fwl data verify` reads the remote split whole (sha256, samples, token range).
    assert main(["data", "verify", f"data.root={tmp_path / 'local'}", f"data.train=[{url}/train/manifest.json]",
                 f"data.tokenizer={paths.tokenizer}", f"model.vocab_size={VOCAB}"]) == 0
    assert f"{url}/train/manifest.json: OK, " in capsys.readouterr().out
    # A command (an object-store CLI in practice) through `pipe:`: it cannot seek, whole shards are read.
    cp = remote_cfg(cfg, paths, tmp_path, f"pipe:cat {root}/train/manifest.json")
    same_rows(cfg, paths, cp, prepare_data(cp, log=lambda s: None), dp=3, steps=10)


def test_transient_failures_are_retried_and_lasting_ones_name_the_shard(served, tmp_path):
    cfg, paths, root, server, url = served
    c = remote_cfg(cfg, paths, tmp_path, f"{url}/train/manifest.json")
    server.fail.update({"manifest.json": 2, "index.npz": 3, "shard-000001.tar": 3})
    rp = prepare_data(c, log=lambda s: None)
    epoch = -(-Manifest.load(paths.train_manifest).tokens // (M * T))
    same_rows(cfg, paths, c, rp, dp=1, steps=epoch + 10)  # more than an epoch: every shard is read
    assert server.fail == {"manifest.json": 0, "index.npz": 0, "shard-000001.tar": 0}  # met and retried
    # Lasting 503s: after RETRIES attempts, an error naming the shard.
    server.fail["shard-000002.tar"] = 10 ** 6
    with pytest.raises(DataError, match=rf"shard {url}/train/shard-000002.tar: cannot read after "
                                        rf"{remote.RETRIES} attempts \(HTTPError: HTTP Error 503"):
        ld = TrainLoader(c, rp)
        for _ in range(400):
            ld.next_batch()
    server.fail.clear()
    # Gone (404): not retried, named.
    (root / "train" / "shard-000003.tar").unlink()
    before = len(server.requests)
    with pytest.raises(DataError, match=rf"shard {url}/train/shard-000003.tar: cannot read \(HTTP 404"):
        ld = TrainLoader(c, rp)
        for _ in range(400):
            ld.next_batch()
    assert sum(p.endswith("shard-000003.tar") for p, _ in server.requests[before:]) == 1
    # An index that cannot be fetched (as opposed to one not published) is an error, not a silent rebuild.
    server.fail["index.npz"] = 10 ** 6
    with pytest.raises(DataError, match=rf"document index {url}/train/index.npz: cannot read after"):
        TrainLoader(c, rp)


def test_a_remote_shard_that_changed_is_named(served, tmp_path):
    cfg, paths, root, server, url = served
    c = remote_cfg(cfg, paths, tmp_path, f"{url}/train/manifest.json")
    rp = prepare_data(c, log=lambda s: None)
    shard = root / "train" / "shard-000002.tar"
    raw = bytearray(shard.read_bytes())
    raw[700:900] = bytes(200)  # same size, other bytes: only the checksum can tell
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"shard {url}/train/shard-000002.tar: corrupt: sha256"):
        ld = TrainLoader(c, rp)
        for _ in range(400):
            ld.next_batch()
    # Without a published index every rank builds one from whole shards: their sha256 catches it.
    (root / "train" / "index.npz").unlink()
    with pytest.raises(DataError, match=rf"shard {url}/train/shard-000002.tar: corrupt: sha256 \w+\.\.\. differs"):
        TrainLoader(c, rp)


def test_missing_index_unreachable_url_and_bad_specs(served, tmp_path):
    cfg, paths, root, server, url = served
    (root / "train" / "index.npz").unlink()
    c = remote_cfg(cfg, paths, tmp_path, f"{url}/train/manifest.json")
    notes: list[str] = []
    rp = prepare_data(c, log=notes.append)
    assert any("no index.npz beside it" in n for n in notes)
    same_rows(cfg, paths, c, rp, dp=2, steps=8)  # the index built in memory gives the same rows
    with ClosedPort() as port:
        bad = remote_cfg(cfg, paths, tmp_path, f"http://127.0.0.1:{port}/train/manifest.json")
        with pytest.raises(DataError, match=rf"shard manifest http://127.0.0.1:{port}/train/manifest.json: "
                                            rf"cannot read after {remote.RETRIES} attempts \(URLError"):
            prepare_data(bad, log=lambda s: None)
    with pytest.raises(DataError, match=r"data.train: .*a remote split is one URL of its shard manifest"):
        prepare_data(dataclasses.replace(c, data=dataclasses.replace(
            c.data, train=[f"{url}/train/manifest.json", "corpus.jsonl"])), log=lambda s: None)
    with pytest.raises(DataError, match=r"data.tokenizer: remote shards .* need the sentencepiece model"):
        prepare_data(dataclasses.replace(c, data=dataclasses.replace(c.data, tokenizer=None)), log=lambda s: None)
    with pytest.raises(DataError, match=r"does not contain 'manifest.json'"):
        TrainLoader(c, dataclasses.replace(rp, train_manifest=f"{url}/train/other.json"))
    fails = remote_cfg(cfg, paths, tmp_path, "pipe:false manifest.json")
    with pytest.raises(DataError, match=r"shard manifest pipe:false manifest.json: cannot read after \d+ "
                                        r"attempts \(OSError: command exited with status 1"):
        prepare_data(fails, log=lambda s: None)


class ClosedPort:
    """A local port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc) -> None:
        pass
