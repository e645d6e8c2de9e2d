"""Data reading that scales with dp: every rank's rows equal a plain reference built from the documented
global order (all shards read whole, documents concatenated); a rank reads only the blocks that hold its
rows; resumes across dp sizes; a shard that changes after indexing is named."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from fwl_scale import IGNORE_INDEX
from fwl_scale.data import DataError, Manifest, TrainLoader
from fwl_scale.data import shard_index
from fwl_scale.data.order import Order
from fwl_scale.data.shard_index import BLOCK, BlockReader, load_index
from fwl_scale.data.shard_read import read_shard
from tests.test_data_loader import M, T, VOCAB, copy, data, with_  # noqa: F401  (copy, data: shared fixtures)


def reference_rows(manifest_path, seed: int, n_rows: int) -> dict[str, np.ndarray]:
    """Rows [0, n_rows) of the packed stream, straight from the definition: epoch e visits the shards in
    permutation rng(seed, e, 0), each shard's documents in rng(seed, e, 1, shard); doc id = e * documents
    + position in the epoch; label = next token of the same document."""
    m = Manifest.load(manifest_path)
    docs = [[d.tokens.astype(np.int64) for d in read_shard(m, e, VOCAB)] for e in m.shards]
    total = sum(len(d) for d in docs)
    ids, doc_ids, labels = [], [], []
    e = 0
    while sum(map(len, ids)) < n_rows * T + 1:
        k = 0
        for s in np.random.default_rng([seed, e, 0]).permutation(len(docs)):
            for j in np.random.default_rng([seed, e, 1, int(s)]).permutation(len(docs[s])):
                t = docs[s][j]
                ids.append(t)
                doc_ids.append(np.full(len(t), e * total + k))
                labels.append(np.concatenate([t[1:], [IGNORE_INDEX]]))
                k += 1
        e += 1
    n = n_rows * T
    return {"input_ids": np.concatenate(ids)[:n].reshape(n_rows, T),
            "labels": np.concatenate(labels)[:n].reshape(n_rows, T),
            "doc_ids": np.concatenate(doc_ids)[:n].reshape(n_rows, T)}


@pytest.mark.parametrize("dp", [1, 3, 5])
def test_every_rank_gets_the_reference_rows(data, dp):
    cfg, paths = data
    steps = 40  # several epochs at dp = 5
    ref = reference_rows(paths.train_manifest, cfg.data.seed, steps * dp * M)
    for r in range(dp):
        loader = TrainLoader(cfg, paths, r, dp)
        for j in range(steps):
            b = loader.next_batch()
            lo = (j * dp + r) * M
            for k in ref:
                assert np.array_equal(b[k].numpy(), ref[k][lo:lo + M]), (dp, r, j, k)


def test_resume_across_dp_sizes_follows_the_reference(data):
    cfg, paths = data
    ref = reference_rows(paths.train_manifest, cfg.data.seed, 3 * 7 * M + 2 * 5 * M + 5 * 6 * M)["input_ids"]
    got, sd = [], None
    for dp, steps in ((3, 7), (2, 5), (5, 6)):  # 3 ranks, then 2, then 5, each from the last state
        ranks = [TrainLoader(cfg, paths, r, dp) for r in range(dp)]
        for ld in ranks:
            if sd is not None:
                ld.load_state_dict(sd)
        for _ in range(steps):
            got += [ld.next_batch()["input_ids"].numpy() for ld in ranks]
        states = [ld.state_dict() for ld in ranks]
        assert all(s == states[0] for s in states)
        sd = states[0]
    assert np.array_equal(np.concatenate(got), ref)


def needed_blocks(cfg, paths, rank: int, dp: int, steps: int) -> set[tuple[int, int]]:
    """The (shard, block) pairs that hold the tokens of rank's rows (and each row's next label). Rows are
    mapped to documents by Order, whose mapping test_every_rank_gets_the_reference_rows checks."""
    m = Manifest.load(paths.train_manifest)
    index = load_index(m, VOCAB)
    first = np.cumsum([0] + [e.documents for e in m.shards])
    order = Order(m, index.doc_tokens, cfg.data.seed, shuffle=True)
    need = set()
    for j in range(steps):
        for r in range(M):
            p = ((j * dp + rank) * M + r) * T
            pos = 0
            while pos < T:
                e, i, off = order.locate(p + pos)
                doc = order.doc(e, i)
                n = min(T - pos, int(index.doc_tokens[doc]) - off)
                s = int(np.searchsorted(first, doc, side="right")) - 1
                start = int(index.doc_offset[doc]) + 2 * off
                end = start + 2 * min(n + 1, int(index.doc_tokens[doc]) - off)
                need |= {(s, b) for b in range(start // BLOCK, -(-end // BLOCK))}
                pos += n
    return need


def test_a_rank_reads_only_the_blocks_of_its_rows(data, monkeypatch):
    cfg, paths = data
    monkeypatch.setattr(shard_index, "CACHE_BLOCKS", 0)  # every read goes to the file
    fetched: list[tuple[int, int]] = []
    real = shard_index.BlockReader._fetch

    def spy(self, s, start, end):
        fetched.extend((s, b) for b in range(start // BLOCK, -(-end // BLOCK)))
        return real(self, s, start, end)

    monkeypatch.setattr(shard_index.BlockReader, "_fetch", spy)
    dp, steps = 6, 8
    m = Manifest.load(paths.train_manifest)
    all_blocks = {(s, b) for s, e in enumerate(m.shards) for b in range(-(-e.bytes // BLOCK))}
    for rank in (0, 4):
        fetched.clear()
        loader = TrainLoader(cfg, paths, rank, dp)
        for _ in range(steps):
            loader.next_batch()
        need = needed_blocks(cfg, paths, rank, dp, steps)
        assert set(fetched) == need
        assert len(need) < len(all_blocks) / 2  # far from the whole stream, which every rank used to read


def test_a_shard_changed_after_indexing_is_named(copy):
    c, new = copy
    root = new.root
    loader = TrainLoader(c, new, 0, 2)
    loader.next_batch()
    for shard in sorted((root / "train").glob("shard-*.tar")):  # same sizes, other token bytes
        data_ = bytearray(shard.read_bytes())
        data_[600:2000] = bytes(1400)
        shard.write_bytes(bytes(data_))
    with pytest.raises(DataError, match=r"shard .*train/shard-\d+\.tar: corrupt: sha256 of the shard no longer "
                                        r"matches .*manifest.json"):
        for _ in range(300):
            loader.next_batch()
    # A new loader refuses it too (the index still stands for the manifest's checksums).
    with pytest.raises(DataError, match=r"shard .*train/shard-\d+\.tar: corrupt"):
        ld = TrainLoader(c, new, 1, 2)
        for _ in range(300):
            ld.next_batch()


def test_index_offsets_read_back_every_document(data):
    """The index's offsets point at each document's ids: reading them back by range gives read_shard's tokens."""
    cfg, paths = data
    m = Manifest.load(paths.train_manifest)
    index = load_index(m, VOCAB)
    reader = BlockReader(m, index)
    docs = [d.tokens for e in m.shards for d in read_shard(m, e, VOCAB)]
    for i, d in enumerate(docs):
        assert np.array_equal(reader.tokens(i, 0, len(d)), d)
        assert np.array_equal(reader.tokens(i, len(d) // 3, len(d) // 2 + 1), d[len(d) // 3:len(d) // 2 + 1])


def test_contiguous_state_through_workers_and_a_restart(data):
    """The carry travels raw from the producer and is made JSON-able only by state_dict: through a prefetch
    worker, and after close() (which restarts from the raw form), the rows and saved states are the same."""
    cfg, paths = data
    c = with_(cfg, **{"data.mode": "contiguous"})
    plain = TrainLoader(c, paths, 1, 3)
    ref = [(plain.next_batch(), plain.state_dict()) for _ in range(12)]
    w = TrainLoader(with_(c, **{"data.loader_workers": 1}), paths, 1, 3)
    for j, (b_ref, s_ref) in enumerate(ref):
        if j == 6:
            w.close()  # the next call restarts from the raw position
        b = w.next_batch()
        assert all(torch.equal(b[k], b_ref[k]) for k in b_ref)
        if j % 4 == 3:
            assert w.state_dict() == s_ref
    w.close()
