"""The streaming loader on real text: packing and labels, one seeded global order, disjoint and complete
dp slices, exact resume (same dp and dp 2 -> 1), prefetch workers, contiguous document streams,
validation batches, whole documents, and damaged or foreign shards."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import load_config
from fwl_scale.data import DataError, Manifest, Tokenizer, TrainLoader, eval_documents, prepare_data, valid_batches
from fwl_scale.atomic import atomic_write_json
from fwl_scale.data.common import sha256_file
from fwl_scale.data.shard_read import read_shard
from tests.corpus import sample_records

VOCAB, T, M = 512, 64, 2


def corpus_docs(n: int = 14) -> list[dict]:
    return sample_records(n, "train", 1500, 12000)


def make_cfg(root: Path, *extra: str):
    return load_config(None, [f"data.root={root}", f"model.vocab_size={VOCAB}", f"model.seq_len={T}",
                              f"parallel.micro_batch={M}", "data.workers=1", "data.shard_bytes=8192",
                              "data.valid_fraction=0.2", "data.loader_workers=0", *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    docs = corpus_docs()
    src = tmp / "corpus.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = make_cfg(tmp / "root", f"data.train=[{src}]")
    paths = prepare_data(cfg, log=lambda s: None)
    return cfg, paths


def with_(cfg, **changes):
    """A copy of cfg with dotted fields changed, e.g. with_(cfg, **{"data.seed": 7})."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), parallel=dataclasses.replace(cfg.parallel),
                              model=dataclasses.replace(cfg.model))
    for key, v in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, v)
    return cfg


def shard_docs(manifest_path: Path) -> list[np.ndarray]:
    m = Manifest.load(manifest_path)
    return [d.tokens for e in m.shards for d in read_shard(m, e, VOCAB)]


def rows(loader: TrainLoader, steps: int) -> list[dict[str, torch.Tensor]]:
    return [loader.next_batch() for _ in range(steps)]


def cat(batches: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])  # rows in order


def split_by_doc(ids: torch.Tensor, doc_ids: torch.Tensor) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    for tok, d in zip(ids.tolist(), doc_ids.tolist()):
        if out and out[-1][0] == d:
            out[-1][1].append(tok)
        else:
            out.append((d, [tok]))
    return out


def check_labels(ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor, eos: int) -> None:
    """On a flat token stream: label = next token of the same document, else IGNORE_INDEX, and the
    ignored positions are exactly the document ends (each a document-end token)."""
    same = doc_ids[1:] == doc_ids[:-1]
    assert torch.equal(labels[:-1][same], ids[1:][same])
    assert (labels[:-1][~same] == IGNORE_INDEX).all()
    ignored = labels[:-1] == IGNORE_INDEX
    assert torch.equal(ignored, ~same)
    assert (ids[:-1][ignored] == eos).all()


def test_packing_gives_back_every_document_with_boundaries_marked(data):
    cfg, paths = data
    manifest = Manifest.load(paths.train_manifest)
    tok = Tokenizer.load(paths.tokenizer)
    loader = TrainLoader(cfg, paths)
    n_rows = -(-2 * manifest.tokens // T) + 40  # two epochs and a bit of the third
    batches = rows(loader, -(-n_rows // M))
    for b in batches:
        assert set(b) == {"input_ids", "labels", "doc_ids"}
        assert all(v.dtype == torch.int64 and v.shape == (M, T) for v in b.values())
    ids, labels, doc_ids = (cat(batches, k).reshape(-1) for k in ("input_ids", "labels", "doc_ids"))
    check_labels(ids, labels, doc_ids, tok.eos_id)
    # Rows are consecutive pieces of one stream: a row's last label is the next row's first token
    # when the document goes on (checked above on the flattened stream, row ends included).
    pieces = split_by_doc(ids, doc_ids)
    n = manifest.documents
    assert [d for d, _ in pieces[: 2 * n + 1]] == list(range(2 * n + 1))
    want = sorted(tuple(t.tolist()) for t in shard_docs(paths.train_manifest))
    epochs = [[tuple(t) for _, t in pieces[e * n:(e + 1) * n]] for e in (0, 1)]
    for docs in epochs:
        assert sorted(docs) == want  # every training document exactly once, whole
        assert all(t[-1] == tok.eos_id for t in docs)
    # The next epoch visits the documents in another order (a new shard and document permutation).
    assert epochs[1] != epochs[0]
    assert len(pieces[2 * n][1]) > 0
    assert loader.consumed_samples == len(batches) * M


def test_same_seed_same_order_other_seed_other_order(data):
    cfg, paths = data
    a = cat(rows(TrainLoader(cfg, paths), 30), "input_ids")
    b = cat(rows(TrainLoader(cfg, paths), 30), "input_ids")
    c = cat(rows(TrainLoader(with_(cfg, **{"data.seed": 99}), paths), 30), "input_ids")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("dp", [2, 3])
def test_dp_slices_are_disjoint_and_complete(data, dp):
    cfg, paths = data
    steps = 12
    ref = {k: cat(rows(TrainLoader(cfg, paths), steps * dp), k) for k in ("input_ids", "labels", "doc_ids")}
    per_rank = [rows(TrainLoader(cfg, paths, r, dp), steps) for r in range(dp)]
    for key in ref:
        # Global micro-batch j = rank 0's rows, then rank 1's, ...: together exactly the dp=1 rows.
        merged = torch.cat([per_rank[r][j][key] for j in range(steps) for r in range(dp)])
        assert torch.equal(merged, ref[key])


@pytest.mark.parametrize("stop", [0, 1, 3, 7])
def test_resume_same_dp_and_dp2_to_dp1_gives_exactly_the_remaining_rows(data, stop):
    cfg, paths = data
    total = 10  # steps at dp=2
    ref = cat(rows(TrainLoader(cfg, paths), 2 * total), "input_ids")  # dp=1 rows in global order
    ranks = [TrainLoader(cfg, paths, r, 2) for r in range(2)]
    seen = [torch.cat([ranks[r].next_batch()["input_ids"] for r in range(2)]) for _ in range(stop)]
    states = [r.state_dict() for r in ranks]
    assert states[0] == states[1]  # the position is global: the same on every rank
    sd = json.loads(json.dumps(states[0]))  # and JSON-able (it goes into the checkpoint)
    assert sd["consumed_samples"] == stop * 2 * M
    # Same dp: fresh loaders continue exactly.
    resumed = [TrainLoader(cfg, paths, r, 2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(sd)
    after = [torch.cat([resumed[r].next_batch()["input_ids"] for r in range(2)]) for _ in range(total - stop)]
    assert torch.equal(torch.cat(seen + after), ref)
    # dp 2 -> 1 (micro batch unchanged): one rank takes the remaining rows, none repeated or skipped.
    single = TrainLoader(cfg, paths, 0, 1)
    single.load_state_dict(sd)
    after1 = cat(rows(single, 2 * (total - stop)), "input_ids")
    assert torch.equal(torch.cat(seen + [after1]), ref)
    # And with another micro batch (3 rows per call) as well.
    other = TrainLoader(with_(cfg, **{"parallel.micro_batch": 3}), paths, 0, 1)
    other.load_state_dict(sd)
    n_left = len(ref) - stop * 2 * M
    after3 = cat(rows(other, -(-n_left // 3)), "input_ids")[:n_left]
    assert torch.equal(torch.cat(seen + [after3]), ref)


def test_prefetch_workers_do_not_change_order_or_state(data):
    cfg, paths = data
    plain = TrainLoader(cfg, paths, 1, 2)
    ref = [(plain.next_batch(), plain.state_dict()) for _ in range(9)]
    w = TrainLoader(with_(cfg, **{"data.loader_workers": 2, "data.prefetch": 2}), paths, 1, 2)
    for b_ref, s_ref in ref[:5]:
        b = w.next_batch()
        assert all(torch.equal(b[k], b_ref[k]) for k in b_ref) and w.state_dict() == s_ref
    # Resume through workers from a worker-made state.
    w2 = TrainLoader(with_(cfg, **{"data.loader_workers": 2}), paths, 1, 2)
    w2.load_state_dict(w.state_dict())
    w.close()
    for b_ref, s_ref in ref[5:]:
        b = w2.next_batch()
        assert all(torch.equal(b[k], b_ref[k]) for k in b_ref) and w2.state_dict() == s_ref
    w2.close()


def test_workers_survive_a_group_sigterm_and_never_block_exit(data):
    """Slurm signals every process of a job step: the workers must keep serving while the trainer
    finishes its step, and a loader nobody closed must not keep the process from exiting."""
    import subprocess
    import sys

    cfg, paths = data
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from fwl_scale.config import load_config
from fwl_scale.data import TrainLoader, prepare_data
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append("TERM"))
cfg = load_config(None, {[f"data.root={paths.root}", f"data.train=[{cfg.data.train[0]}]", f"model.vocab_size={VOCAB}",
                          f"model.seq_len={T}", "data.workers=1", "data.shard_bytes=8192", "data.valid_fraction=0.2",
                          "data.loader_workers=2"]!r})
paths = prepare_data(cfg, log=lambda s: None)
LEAKED = TrainLoader(cfg, paths)
LEAKED.next_batch()
os.killpg(0, signal.SIGTERM)
for _ in range(6):
    LEAKED.next_batch()
print("served after SIGTERM", got)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       start_new_session=True)  # its own process group: the signal stays inside
    assert r.returncode == 0, r.stderr
    assert "served after SIGTERM ['TERM']" in r.stdout


def slot_streams(cfg, paths, dp: int, steps: int, state=None, micro: int = M):
    """Per global slot, the concatenated rows of `steps` calls (all ranks), and the last state."""
    c = with_(cfg, **{"data.mode": "contiguous", "parallel.micro_batch": micro})
    loaders = [TrainLoader(c, paths, r, dp) for r in range(dp)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out: dict[str, list[list[torch.Tensor]]] = {k: [[] for _ in range(micro * dp)] for k in ("input_ids", "labels", "doc_ids")}
    for _ in range(steps):
        for r, ld in enumerate(loaders):
            b = ld.next_batch()
            for k in out:
                for i in range(micro):
                    out[k][r * micro + i].append(b[k][i])
    return {k: [torch.cat(v) for v in out[k]] for k in out}, loaders[0].state_dict()


def test_contiguous_mode_continues_each_document_across_steps(data):
    cfg, paths = data
    tok = Tokenizer.load(paths.tokenizer)
    steps = 120
    streams, _ = slot_streams(cfg, paths, 2, steps)
    packed = split_by_doc(*(cat(rows(TrainLoader(cfg, paths), 300), k).reshape(-1) for k in ("input_ids", "doc_ids")))
    packed_docs = {d: toks for d, toks in packed}
    started = []
    for s in range(2 * M):
        ids, labels, doc_ids = streams["input_ids"][s], streams["labels"][s], streams["doc_ids"][s]
        assert len(ids) == steps * T
        # Within a slot, labels follow the slot's own stream — across call boundaries too: the label of a
        # row's last position is the first token of the slot's next segment of the same document.
        check_labels(ids, labels, doc_ids, tok.eos_id)
        pieces = split_by_doc(ids, doc_ids)
        assert len(pieces) >= 2, "documents must run through several calls and end inside the window"
        for j, (d, toks) in enumerate(pieces):
            started.append(d)
            whole = packed_docs[d]  # the same document as in the packed order (same global order)
            if j < len(pieces) - 1:
                assert toks == whole  # whole document, start to end, in one slot
            else:
                assert toks == whole[: len(toks)]  # still running at the end of the window
    # Slots take documents from the one global order: all handed-out documents, none twice.
    assert sorted(started) == list(range(len(started)))


def test_contiguous_resume_keeps_every_slot_stream(data):
    cfg, paths = data
    ref, _ = slot_streams(cfg, paths, 2, 30)
    first, sd = slot_streams(cfg, paths, 2, 11)
    # dp 2 -> 1 with micro_batch 2 -> 4: the same 4 global slots continue where they were.
    rest, _ = slot_streams(cfg, paths, 1, 19, state=sd, micro=2 * M)
    for k in ref:
        for s in range(2 * M):
            assert torch.equal(torch.cat([first[k][s], rest[k][s]]), ref[k][s])
    c = with_(cfg, **{"data.mode": "contiguous"})
    with pytest.raises(DataError, match=r"contiguous mode saved with 4 global slots; now micro_batch 2 x dp 1 = 2"):
        TrainLoader(c, paths, 0, 1).load_state_dict(sd)
    with pytest.raises(DataError, match=r"saved with data/model mode = 'contiguous', now 'packed'"):
        TrainLoader(cfg, paths, 0, 1).load_state_dict(sd)


def test_valid_batches_and_eval_documents(data):
    cfg, paths = data
    valid = shard_docs(paths.valid_manifest)
    a, b = valid_batches(cfg, paths, None), valid_batches(cfg, paths, None)
    assert len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    ids, labels, doc_ids = (cat(a, k).reshape(-1) for k in ("input_ids", "labels", "doc_ids"))
    real = doc_ids >= 0
    assert torch.equal(ids[real], torch.from_numpy(np.concatenate(valid).astype(np.int64)))
    assert (labels[~real] == IGNORE_INDEX).all() and real.sum() > len(ids) - M * T
    tok = Tokenizer.load(paths.tokenizer)
    check_labels(ids[real], labels[real], doc_ids[real], tok.eos_id)
    # dp=2: the same rows split between the ranks, the same number of batches on each.
    r0, r1 = valid_batches(cfg, paths, None, 0, 2), valid_batches(cfg, paths, None, 1, 2)
    assert len(r0) == len(r1) == -(-len(a) // 2)
    merged = torch.cat([torch.cat([x["input_ids"], y["input_ids"]]) for x, y in zip(r0, r1)])
    assert torch.equal(merged[: len(a) * M], cat(a, "input_ids"))
    # A limit takes groups spread over the whole split (not its first rows), the same ones at dp = 1 and 2.
    assert len(a) >= 4
    two = valid_batches(cfg, paths, 2)
    assert len(two) == 2 and all(torch.equal(x[k], a[g][k]) for x, g in zip(two, (0, len(a) // 2)) for k in x)
    s0, s1 = valid_batches(cfg, paths, 1, 0, 2), valid_batches(cfg, paths, 1, 1, 2)
    assert all(torch.equal(x[k], y[k]) for x, y in zip((s0[0], s1[0]), two) for k in x)
    docs = list(eval_documents(cfg, paths))
    assert [d.tolist() for d in docs] == [v.tolist() for v in valid] and all(d.dtype == torch.int64 for d in docs)
    assert len(list(eval_documents(cfg, paths, max_docs=1))) == 1


def test_shards_are_standard_webdataset_and_both_readers_agree(data):
    import webdataset as wds

    cfg, paths = data
    m = Manifest.load(paths.train_manifest)
    urls = [str(m.shard_path(e)) for e in m.shards]
    # A stock webdataset pipeline reads the shards: one sample per document, in index order.
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:010d}" for i in range(m.documents)]
    assert all(set(s) >= {"ids.u16", "json"} for s in samples)
    fast = [d for e in m.shards for d in read_shard(m, e, VOCAB, reader="fast")]
    slow = [d for e in m.shards for d in read_shard(m, e, VOCAB, reader="webdataset")]
    assert [(d.index, d.key, d.tokens.tolist()) for d in fast] == [(d.index, d.key, d.tokens.tolist()) for d in slow]
    assert [d.tokens.tolist() for d in fast] == [np.frombuffer(s["ids.u16"], "<u2").tolist() for s in samples]


def test_tars_with_pax_headers_are_read_through_webdataset(copy):
    import webdataset as wds

    cfg, paths = copy
    m = Manifest.load(paths.train_manifest)
    before = read_shard(m, m.shards[1], VOCAB)
    shard = m.shard_path(m.shards[1])
    samples = list(wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False))
    with open(shard, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0.5) as w:  # float mtime: PAX headers
        for s in samples:
            w.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    assert b"PaxHeader" in shard.read_bytes()
    rewrite_manifest_entry(paths, shard)
    m2 = Manifest.load(paths.train_manifest)
    after = read_shard(m2, m2.shards[1], VOCAB, reader="fast")
    assert [d.tokens.tolist() for d in after] == [d.tokens.tolist() for d in before]


# ----------------------------------------------------------------------------------------------------
# Damaged and foreign shards


@pytest.fixture
def copy(data, tmp_path):
    cfg, paths = data
    root = tmp_path / "root"
    shutil.copytree(paths.root, root)
    new = dataclasses.replace(paths, root=root, tokenizer=root / "tokenizer" / "spm.model",
                              train_manifest=root / "train" / "manifest.json",
                              valid_manifest=root / "valid" / "manifest.json")
    return with_(cfg, **{"data.root": str(root)}), new


def rewrite_manifest_entry(paths, shard: Path) -> None:
    """Records a shard's current size and checksum, as if the manifest had been written for it."""
    d = json.loads(paths.train_manifest.read_text())
    for e in d["shards"]:
        if e["name"] == shard.name:
            e["bytes"], e["sha256"] = shard.stat().st_size, sha256_file(shard)
    atomic_write_json(paths.train_manifest, d)


def drain(loader: TrainLoader, n: int = 400) -> None:
    for _ in range(n):
        loader.next_batch()


def test_truncated_or_corrupt_tar_names_the_shard(copy):
    cfg, paths = copy
    shard = paths.root / "train" / "shard-000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-700])
    with pytest.raises(DataError, match=r"shard .*shard-000003.tar: \d+ bytes but .*manifest.json records \d+: truncated"):
        TrainLoader(cfg, paths)
    # Same size, damaged bytes: the checksum catches it when the shard is read.
    shard.write_bytes(data[:1000] + bytes(64) + data[1064:])
    with pytest.raises(DataError, match=r"shard .*shard-000003.tar: corrupt: sha256"):
        drain(TrainLoader(cfg, paths))
    # A truncated tar whose manifest entry was rewritten to match: the tar reader itself fails.
    shard.write_bytes(data[: len(data) // 2 + 100])
    rewrite_manifest_entry(paths, shard)
    with pytest.raises(DataError, match=r"shard .*shard-000003.tar: (corrupt tar|holds \d+ documents|sample .* lacks)"):
        drain(TrainLoader(cfg, paths))


def test_shards_of_another_tokenizer_are_refused(copy, tmp_path):
    cfg, paths = copy
    from fwl_scale.data import train_tokenizer

    other = train_tokenizer([d["text"] for d in corpus_docs(4)], tmp_path / "other.model", VOCAB, "unigram")
    foreign = dataclasses.replace(paths, tokenizer=other.path, tokenizer_checksum=other.checksum)
    with pytest.raises(DataError, match=r"shard .*shard-000000.tar: tokenized with tokenizer \w+, but the model's "
                                        r"tokenizer .*other.model is \w+"):
        TrainLoader(cfg, foreign)
    with pytest.raises(DataError, match=r"shard .*valid.*shard-000000.tar: tokenized with tokenizer"):
        valid_batches(cfg, foreign, 1)


def test_token_ids_beyond_the_vocabulary_name_shard_and_document(copy):
    import webdataset as wds

    cfg, paths = copy
    shard = paths.root / "train" / "shard-000002.tar"
    samples = list(wds.tariterators.group_by_keys(
        wds.tariterators.tar_file_expander([{"url": str(shard), "stream": io.BytesIO(shard.read_bytes())}])))
    ids = np.frombuffer(samples[0]["ids.u16"], dtype="<u2").copy()
    ids[5] = VOCAB + 88
    samples[0]["ids.u16"] = ids.tobytes()
    with open(shard, "wb") as f, wds.TarWriter(f, encoder=False) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    rewrite_manifest_entry(paths, shard)
    key = json.loads(samples[0]["json"])["id"]
    with pytest.raises(DataError, match=rf"shard .*shard-000002.tar: document '{key}' .* has token id {VOCAB + 88} >= "
                                        rf"vocabulary size {VOCAB}"):
        drain(TrainLoader(cfg, paths))
    # Raised inside a prefetch worker, the error still names the shard.
    with pytest.raises(DataError, match=rf"shard-000002.tar: document '{key}'"):
        drain(TrainLoader(with_(cfg, **{"data.loader_workers": 1}), paths))


def test_missing_manifest_bad_rank_and_foreign_state(copy, data):
    cfg, paths = copy
    with pytest.raises(DataError, match=r"dp_rank 2 is not in \[0, dp_size = 2\)"):
        TrainLoader(cfg, paths, 2, 2)
    sd = TrainLoader(cfg, paths).state_dict()
    with pytest.raises(DataError, match=r"saved with data/model seq_len = 64, now 32"):
        TrainLoader(with_(cfg, **{"model.seq_len": 32}), paths).load_state_dict(sd)
    with pytest.raises(DataError, match=r"saved for other shards"):
        TrainLoader(cfg, paths).load_state_dict({**sd, "dataset": "0" * 64})
    paths.train_manifest.unlink()
    with pytest.raises(DataError, match=r"train/manifest.json: no training manifest; run `fwl data shards`"):
        TrainLoader(cfg, paths)
