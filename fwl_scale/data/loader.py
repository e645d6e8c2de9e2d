"""The streaming loader: one global, seeded order of documents packed into training rows.

The order. Epoch e visits the train shards in a permutation seeded by (seed, e), and the documents of
each shard in a permutation seeded by (seed, e, shard). Concatenated, the documents form one infinite
token stream, each document ending with the document-end token.

Packed mode. Row r of the stream is tokens [r*T, (r+1)*T). labels[t] is the next token of the same
document (for the row's last position too, when the document goes on), IGNORE_INDEX where the next token
belongs to another document. doc_ids number the documents of the stream (epoch * documents + position in
the epoch), so they differ between any two documents and are equal within one. Each call of
`next_batch` consumes one global micro-batch of micro_batch * dp rows; data-parallel rank d gets rows
[d * micro_batch, (d + 1) * micro_batch) of it. Tensor-, pipeline- and context-parallel peers pass the
same dp rank and so get identical data.

Contiguous mode. The global batch has micro_batch * dp slots; every call advances every slot by T
tokens of its own document stream. A slot that finishes a document takes the next one from the global
order (slots served in slot order), so a long document runs through consecutive calls in one slot and the
label of a row's last position is the first token of the slot's next segment when the document goes on.

State (Megatron style). Every rank follows the whole global stream and builds only its own rows, so the
position after a call — consumed samples, plus the packer's carry: the document and token offset where
the stream stands (contiguous: where every slot stands, and the next document to hand out) — is the same
on every rank and independent of dp. A resume, with the same or another dp size, continues with exactly
the rows not yet consumed. Contiguous mode needs the same number of global slots to resume.

Prefetch. With `data.loader_workers` = W > 0, W worker processes each follow the whole stream and build
every W-th global micro-batch; torch's DataLoader returns worker outputs round-robin, which is exactly the
global order again. Workers only read ahead; they never decide the order.
"""
from __future__ import annotations

import atexit
import math
import signal
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fwl_scale import IGNORE_INDEX
from fwl_scale.config import Config
from fwl_scale.data.common import DataError, sha256_file
from fwl_scale.data.shards import Manifest, read_shard

STATE_FORMAT = "fwl_scale.loader/1"
PAD_DOC_ID = -1  # doc id of padding positions in the last validation batch (their labels are ignored)


@dataclass(frozen=True)
class Loc:
    """Where a document stands in the global order."""
    epoch: int
    shard_pos: int  # position in the epoch's shard permutation
    doc_pos: int  # position in the shard's document permutation


class _Split:
    """The documents of one split in the global order. shuffle=False: manifest order, a single pass."""

    def __init__(self, manifest: Manifest, vocab_size: int, seed: int, shuffle: bool):
        self.manifest = manifest
        self.vocab_size = vocab_size
        self.seed = seed
        self.shuffle = shuffle
        self.doc_counts = np.array([s.documents for s in manifest.shards], dtype=np.int64)
        self.total_docs = int(self.doc_counts.sum())
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cached: tuple[int, int] | None = None
        self._cached_docs: list[np.ndarray] = []

    def shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard permutation and the number of documents before each of its positions."""
        if epoch not in self._orders:
            n = len(self.doc_counts)
            order = (np.random.default_rng([self.seed, epoch, 0]).permutation(n) if self.shuffle
                     else np.arange(n))
            before = np.concatenate([[0], np.cumsum(self.doc_counts[order])[:-1]])
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = (order, before)
        return self._orders[epoch]

    def docs_in(self, epoch: int, shard_pos: int) -> int:
        return int(self.doc_counts[self.shard_order(epoch)[0][shard_pos]])

    def seq(self, loc: Loc) -> int:
        """A number unique to this visit of the document in the stream (its doc id)."""
        return loc.epoch * self.total_docs + int(self.shard_order(loc.epoch)[1][loc.shard_pos]) + loc.doc_pos

    def _load(self, epoch: int, shard_pos: int) -> list[np.ndarray]:
        if self._cached != (epoch, shard_pos):
            shard_id = int(self.shard_order(epoch)[0][shard_pos])
            docs = [d.tokens for d in read_shard(self.manifest, self.manifest.shards[shard_id], self.vocab_size)]
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, 1, shard_id]).permutation(len(docs))
                docs = [docs[i] for i in perm]
            self._cached, self._cached_docs = (epoch, shard_pos), docs
        return self._cached_docs

    def doc(self, loc: Loc) -> np.ndarray:
        return self._load(loc.epoch, loc.shard_pos)[loc.doc_pos]

    def next(self, loc: Loc) -> Loc | None:
        if loc.doc_pos + 1 < self.docs_in(loc.epoch, loc.shard_pos):
            return Loc(loc.epoch, loc.shard_pos, loc.doc_pos + 1)
        if loc.shard_pos + 1 < len(self.doc_counts):
            return Loc(loc.epoch, loc.shard_pos + 1, 0)
        return Loc(loc.epoch + 1, 0, 0) if self.shuffle else None


def _fill_piece(doc: np.ndarray, offset: int, n: int, ids: np.ndarray, labels: np.ndarray, pos: int) -> None:
    """Copies doc[offset:offset+n] to ids[pos:pos+n] with next-token labels from the same document; the
    label after the document's last token is IGNORE_INDEX."""
    ids[pos:pos + n] = doc[offset:offset + n]
    nxt = doc[offset + 1:offset + n + 1]
    labels[pos:pos + len(nxt)] = nxt
    labels[pos + len(nxt):pos + n] = IGNORE_INDEX


class _PackedStream:
    """The token stream cut into rows of T tokens; its carry is (document location, token offset)."""

    def __init__(self, split: _Split, seq_len: int, loc: Loc | None, offset: int):
        self.split, self.T, self.loc, self.offset = split, seq_len, loc, offset

    def carry(self) -> list[int] | None:
        return None if self.loc is None else [self.loc.epoch, self.loc.shard_pos, self.loc.doc_pos, self.offset]

    def skip_rows(self, n_rows: int) -> None:
        """Advances without building (other ranks' rows)."""
        left = n_rows * self.T
        while left > 0 and self.loc is not None:
            L = len(self.split.doc(self.loc))
            take = min(left, L - self.offset)
            self.offset += take
            left -= take
            if self.offset == L:
                self.loc, self.offset = self.split.next(self.loc), 0

    def row(self, ids: np.ndarray, labels: np.ndarray, doc_ids: np.ndarray) -> None:
        """Fills one row; past the end of a finite split the rest is padding (ignored labels)."""
        pos = 0
        while pos < self.T:
            if self.loc is None:
                ids[pos:] = 0
                labels[pos:] = IGNORE_INDEX
                doc_ids[pos:] = PAD_DOC_ID
                return
            doc = self.split.doc(self.loc)
            n = min(self.T - pos, len(doc) - self.offset)
            _fill_piece(doc, self.offset, n, ids, labels, pos)
            doc_ids[pos:pos + n] = self.split.seq(self.loc)
            pos += n
            self.offset += n
            if self.offset == len(doc):
                self.loc, self.offset = self.split.next(self.loc), 0


class _ContiguousStreams:
    """One document stream per global slot. Only the slots in `keep` hold their tokens; the others are
    followed by length alone (they belong to other ranks)."""

    def __init__(self, split: _Split, seq_len: int, n_slots: int, keep: range, queue: Loc,
                 slots: list[list[int] | None]):
        self.split, self.T, self.keep, self.queue = split, seq_len, keep, queue
        # per slot: [loc, offset, length, seq, tokens or None] or None (takes the next document)
        self.slots: list[list[Any] | None] = [None] * n_slots
        # Restoring a carry reads each slot's document again; visiting them in stream order reads each
        # shard once.
        order = sorted((i for i, s in enumerate(slots) if s is not None), key=lambda i: slots[i][:3])
        for i in order:
            e, sp, dp, off = slots[i]
            self._assign(i, Loc(e, sp, dp), off)

    def _assign(self, i: int, loc: Loc, offset: int) -> None:
        doc = self.split.doc(loc)
        tokens = doc.copy() if i in self.keep else None  # a copy: the shard cache moves on
        self.slots[i] = [loc, offset, len(doc), self.split.seq(loc), tokens]

    def carry(self) -> dict[str, Any]:
        return {"queue": [self.queue.epoch, self.queue.shard_pos, self.queue.doc_pos],
                "slots": [None if s is None else [s[0].epoch, s[0].shard_pos, s[0].doc_pos, s[1]]
                          for s in self.slots]}

    def step(self, build: bool, ids: np.ndarray, labels: np.ndarray, doc_ids: np.ndarray) -> None:
        for i in range(len(self.slots)):
            row = i - self.keep.start
            fill = build and i in self.keep
            pos = 0
            while pos < self.T:
                if self.slots[i] is None:
                    self._assign(i, self.queue, 0)
                    nxt = self.split.next(self.queue)
                    assert nxt is not None  # the training split is infinite
                    self.queue = nxt
                s = self.slots[i]
                n = min(self.T - pos, s[2] - s[1])
                if fill:
                    _fill_piece(s[4], s[1], n, ids[row], labels[row], pos)
                    doc_ids[row, pos:pos + n] = s[3]
                pos += n
                s[1] += n
                if s[1] == s[2]:
                    self.slots[i] = None


@dataclass
class _Spec:
    """Everything a producer needs; picklable for loader worker processes."""
    manifest: Manifest
    vocab_size: int
    seed: int
    mode: str
    seq_len: int
    micro_batch: int
    dp_rank: int
    dp_size: int
    state: dict[str, Any]


class _Producer:
    """Follows the global stream from a state; builds this rank's part of chosen global micro-batches."""

    def __init__(self, spec: _Spec):
        self.spec = spec
        st = spec.state
        self.split = _Split(spec.manifest, spec.vocab_size, spec.seed, shuffle=True)
        self.consumed = int(st["consumed_samples"])
        self.steps = int(st["steps"])
        m, d = spec.micro_batch, spec.dp_rank
        if spec.mode == "packed":
            e, sp, dp, off = st["cursor"]
            self.stream = _PackedStream(self.split, spec.seq_len, Loc(e, sp, dp), off)
        else:
            q = st["queue"]
            self.streams = _ContiguousStreams(self.split, spec.seq_len, m * spec.dp_size,
                                              range(d * m, (d + 1) * m), Loc(*q), st["slots"])

    def state(self) -> dict[str, Any]:
        st = dict(self.spec.state)
        st.update(consumed_samples=self.consumed, steps=self.steps)
        if self.spec.mode == "packed":
            st["cursor"] = self.stream.carry()
        else:
            st.update(self.streams.carry())
        return st

    def global_step(self, build: bool) -> dict[str, Any] | None:
        sp = self.spec
        m, T, d, D = sp.micro_batch, sp.seq_len, sp.dp_rank, sp.dp_size
        out = None
        if build:
            # One [3, m, T] block: a single shared-memory transfer from a loader worker instead of three.
            block = np.empty((3, m, T), dtype=np.int64)
            ids, labels, doc_ids = block[0], block[1], block[2]
        if sp.mode == "packed":
            self.stream.skip_rows(d * m)
            if build:
                for r in range(m):
                    self.stream.row(ids[r], labels[r], doc_ids[r])
            else:
                self.stream.skip_rows(m)
            self.stream.skip_rows((D - d - 1) * m)
        else:
            if build:
                self.streams.step(True, ids, labels, doc_ids)
            else:
                self.streams.step(False, None, None, None)  # type: ignore[arg-type]
        self.consumed += m * D
        self.steps += 1
        if build:
            out = {"block": torch.from_numpy(block), "state": self.state()}
        return out


class _BatchStream(torch.utils.data.IterableDataset):
    def __init__(self, spec: _Spec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        k, W = (info.id, info.num_workers) if info is not None else (0, 1)
        producer = _Producer(self.spec)
        j = 0
        while True:
            out = producer.global_step(build=(j % W == k))
            if out is not None:
                yield out
            j += 1


# Prefetch workers leave stop signals to the training process: Slurm signals every process of a job
# step, and a worker killed by SIGTERM would break the step the trainer is finishing before it saves a
# checkpoint. The signals are blocked while the workers are forked (so none arrives before they ignore
# it; the parent gets its own once unblocked) and ignored in the workers. A worker still exits when its
# parent does (torch's watchdog), and close() kills what shutdown leaves.
_WORKER_IGNORED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _worker_init(_: int) -> None:
    for sig in _WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_IGNORED)


_OPEN_LOADERS: "weakref.WeakSet[TrainLoader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    # Runs before multiprocessing's own exit handler (registered earlier), which would terminate and
    # then join the workers: with SIGTERM ignored in them, that join would wait forever.
    for loader in list(_OPEN_LOADERS):
        loader.close()


def _tokenizer_checksum(paths: Any) -> tuple[str, str]:
    tok_path = Path(paths.tokenizer)
    if not tok_path.is_file():
        raise DataError(f"{tok_path}: no such tokenizer model (run `fwl data shards` or prepare_data first)")
    return sha256_file(tok_path), str(tok_path)


def _open_manifest(path: Any, cfg: Config, paths: Any, what: str) -> Manifest:
    if path is None or not Path(path).is_file():
        raise DataError(f"{path}: no {what} manifest; run `fwl data shards` (prepare_data) first")
    m = Manifest.load(path)
    m.check_files()
    checksum, name = _tokenizer_checksum(paths)
    m.check_tokenizer(checksum, name, cfg.model.vocab_size)
    return m


class TrainLoader:
    """Training batches for one data-parallel rank; see the module docstring for the order and state."""

    def __init__(self, cfg: Config, paths: Any, dp_rank: int = 0, dp_size: int = 1):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"TrainLoader: dp_rank {dp_rank} is not in [0, dp_size = {dp_size})")
        self.cfg = cfg
        self.manifest = _open_manifest(paths.train_manifest, cfg, paths, "training")
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.mode = cfg.data.mode
        self.seq_len = cfg.model.seq_len
        self.micro_batch = cfg.parallel.micro_batch
        self.seed = cfg.data.seed
        self.workers = cfg.data.loader_workers
        self.prefetch = cfg.data.prefetch
        self._state = self._initial_state()
        self._it: Iterator[dict[str, Any]] | None = None
        self._loader: Any = None

    @property
    def global_slots(self) -> int:
        """Rows per global micro-batch (contiguous mode: document streams)."""
        return self.micro_batch * self.dp_size

    @property
    def tokens_per_batch(self) -> int:
        return self.micro_batch * self.seq_len

    def _initial_state(self) -> dict[str, Any]:
        st: dict[str, Any] = {"format": STATE_FORMAT, "mode": self.mode, "seq_len": self.seq_len,
                              "seed": self.seed, "dataset": self.manifest.dataset_id,
                              "consumed_samples": 0, "steps": 0}
        if self.mode == "packed":
            st["cursor"] = [0, 0, 0, 0]
        else:
            st.update(global_slots=self.global_slots, queue=[0, 0, 0], slots=[None] * self.global_slots)
        return st

    def _spec(self) -> _Spec:
        return _Spec(self.manifest, self.cfg.model.vocab_size, self.seed, self.mode, self.seq_len,
                     self.micro_batch, self.dp_rank, self.dp_size, dict(self._state))

    def _start(self) -> None:
        ds = _BatchStream(self._spec())
        _OPEN_LOADERS.add(self)
        if self.workers == 0:
            self._it = iter(ds)
        else:
            self._loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.workers,
                                                       prefetch_factor=self.prefetch, worker_init_fn=_worker_init)
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_IGNORED)
            try:
                self._it = iter(self._loader)  # forks the workers
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """{"input_ids", "labels", "doc_ids"}: int64 [micro_batch, seq_len] for this rank."""
        if self._it is None:
            self._start()
        assert self._it is not None
        out = next(self._it)
        self._state = out["state"]
        block = out["block"]
        return {"input_ids": block[0], "labels": block[1], "doc_ids": block[2]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def consumed_samples(self) -> int:
        return int(self._state["consumed_samples"])

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch returned: identical on every dp rank; JSON-able."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._state.items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continues from a saved position, also with another dp size (contiguous mode: the same number of
        global slots, micro_batch * dp)."""
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise DataError(f"loader state: not a {STATE_FORMAT} state")
        for key, mine in [("mode", self.mode), ("seq_len", self.seq_len), ("seed", self.seed)]:
            if sd.get(key) != mine:
                raise DataError(f"loader state: saved with data/model {key} = {sd.get(key)!r}, now {mine!r}; "
                                f"the position cannot be continued")
        if sd.get("dataset") != self.manifest.dataset_id:
            raise DataError(f"loader state: saved for other shards (dataset {str(sd.get('dataset'))[:12]}), "
                            f"{self.manifest.path} is {self.manifest.dataset_id[:12]}")
        if self.mode == "contiguous" and sd.get("global_slots") != self.global_slots:
            raise DataError(f"loader state: contiguous mode saved with {sd.get('global_slots')} global slots; "
                            f"now micro_batch {self.micro_batch} x dp {self.dp_size} = {self.global_slots}. "
                            f"Keep micro_batch x dp equal to resume document streams")
        self.close()
        self._state = dict(sd)

    def close(self) -> None:
        """Stops the prefetch workers now. They ignore SIGTERM (see _worker_init), so anything torch's
        shutdown leaves alive is killed outright; an unclosed loader is closed at interpreter exit."""
        it, self._it, self._loader = self._it, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is None:
            return
        workers = list(getattr(it, "_workers", []))
        try:
            shutdown()
        finally:
            for w in workers:
                if w.is_alive():
                    w.kill()
                    w.join(timeout=5)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def valid_batches(cfg: Config, paths: Any, max_batches: int | None, dp_rank: int = 0,
                  dp_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Packed validation batches in manifest order (no shuffling, one pass): the same on every call.
    Rank d gets rows [d * micro_batch, (d + 1) * micro_batch) of each global batch. Every rank returns the
    same number of batches; the last is padded (labels IGNORE_INDEX, doc id -1) where the split ends."""
    if getattr(paths, "valid_manifest", None) is None:
        return []
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"valid_batches: dp_rank {dp_rank} is not in [0, dp_size = {dp_size})")
    manifest = _open_manifest(paths.valid_manifest, cfg, paths, "validation")
    m, T = cfg.parallel.micro_batch, cfg.model.seq_len
    split = _Split(manifest, cfg.model.vocab_size, seed=0, shuffle=False)
    stream = _PackedStream(split, T, Loc(0, 0, 0), 0)
    n = math.ceil(math.ceil(manifest.tokens / T) / (m * dp_size))
    if max_batches is not None:
        n = min(n, max_batches)
    out = []
    for _ in range(n):
        ids = np.empty((m, T), dtype=np.int64)
        labels = np.empty((m, T), dtype=np.int64)
        doc_ids = np.empty((m, T), dtype=np.int64)
        stream.skip_rows(dp_rank * m)
        for r in range(m):
            stream.row(ids[r], labels[r], doc_ids[r])
        stream.skip_rows((dp_size - dp_rank - 1) * m)
        out.append({"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                    "doc_ids": torch.from_numpy(doc_ids)})
    return out


def eval_documents(cfg: Config, paths: Any, max_docs: int | None = None) -> Iterator[torch.Tensor]:
    """Whole validation documents in manifest order, each a 1-D int64 tensor ending with the
    document-end token (for long-document evaluation)."""
    if getattr(paths, "valid_manifest", None) is None:
        return
    manifest = _open_manifest(paths.valid_manifest, cfg, paths, "validation")
    n = 0
    for entry in manifest.shards:
        for doc in read_shard(manifest, entry, cfg.model.vocab_size):
            if max_docs is not None and n >= max_docs:
                return
            yield torch.from_numpy(doc.tokens.astype(np.int64))
            n += 1
