"""The streaming loader: training rows for one data-parallel rank, and validation batches.

The global order and the arithmetic that places a row in it: order.py. Packed mode: row r of the stream
is tokens [r*T, (r+1)*T); labels[t] is the next token of the same document (for the row's last position
too, when the document goes on), IGNORE_INDEX where the next token belongs to another document. doc_ids
number the documents of the stream (epoch * documents + position in the epoch), so they differ between
any two documents and are equal within one. Each call of `next_batch` consumes one global micro-batch of
micro_batch * dp rows; data-parallel rank d gets rows [d * micro_batch, (d + 1) * micro_batch) of it.
Tensor-, pipeline- and context-parallel peers pass the same dp rank and so get identical data.

Contiguous mode. The global batch has micro_batch * dp slots; every call advances every slot by T
tokens of its own document stream (order.ContiguousStreams), so a long document runs through consecutive
calls in one slot and the label of a row's last position is the first token of the slot's next segment.

Reading. A rank reads only the tokens of its own rows (byte ranges of the shards, checked block by block
against the document index, shard_index.py); the others' rows are arithmetic. Its reading therefore does
not grow with dp (bench/bench_loader.py).

State (Megatron style). The position after a call — consumed samples, plus the packer's carry: the
document and token offset where the stream stands (contiguous: where every slot stands, and the next
document to hand out) — is the same on every rank and independent of dp. A resume, with the same or
another dp size, continues with exactly the rows not yet consumed. Contiguous mode needs the same number
of global slots to resume.

Prefetch. With `data.loader_workers` = W > 0, W worker processes each build every W-th global
micro-batch; torch's DataLoader returns worker outputs round-robin, which is exactly the global order
again. Workers only read ahead; they never decide the order.
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

from fwl_scale.config import Config
from fwl_scale.data.common import DataError, sha256_file
from fwl_scale.data.manifest import Manifest
from fwl_scale.data.order import ContiguousStreams, Order, packed_rows, saved_carry
from fwl_scale.data.remote import is_url
from fwl_scale.data.shard_index import BlockReader, ShardIndex, load_index
from fwl_scale.data.shard_read import read_shard

STATE_FORMAT = "fwl_scale.loader/1"


@dataclass
class _Spec:
    """Everything a producer needs; picklable for loader worker processes."""
    manifest: Manifest
    index: ShardIndex
    seed: int
    mode: str
    seq_len: int
    micro_batch: int
    dp_rank: int
    dp_size: int
    state: dict[str, Any]


class _Producer:
    """Follows the global position from a state; builds this rank's part of chosen global micro-batches."""

    def __init__(self, spec: _Spec):
        self.spec = spec
        st = spec.state
        self.order = Order(spec.manifest, spec.index.doc_tokens, spec.seed, shuffle=True)
        self.reader = BlockReader(spec.manifest, spec.index)
        self.consumed = int(st["consumed_samples"])
        self.steps = int(st["steps"])
        m, d = spec.micro_batch, spec.dp_rank
        if spec.mode == "packed":
            self.p = self.order.position(st["cursor"])  # stream token where the next global batch starts
        else:
            self.streams = ContiguousStreams(self.order, self.reader, spec.seq_len, range(d * m, (d + 1) * m), st)

    def state(self) -> dict[str, Any]:
        st = dict(self.spec.state)
        st.update(consumed_samples=self.consumed, steps=self.steps)
        if self.spec.mode == "packed":
            st["cursor"] = self.order.cursor(self.p)
        else:
            for key in ("queue", "slots"):
                st.pop(key, None)
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
            if build:
                packed_rows(self.order, self.reader, self.p + d * m * T, ids, labels, doc_ids)
            self.p += m * D * T
        elif build:
            self.streams.step(True, ids, labels, doc_ids)
        else:
            self.streams.step(False, None, None, None)
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
    """The split's manifest, checked against the files and the tokenizer."""
    if path is None or not (is_url(path) or Path(path).is_file()):
        raise DataError(f"{path}: no {what} manifest; run `fwl data shards` (prepare_data) first")
    m = Manifest.load(path)
    m.check_files()
    checksum, name = _tokenizer_checksum(paths)
    m.check_tokenizer(checksum, name, cfg.model.vocab_size)
    return m


def _open_split(path: Any, cfg: Config, paths: Any, what: str) -> tuple[Manifest, ShardIndex]:
    m = _open_manifest(path, cfg, paths, what)
    return m, load_index(m, cfg.model.vocab_size)


class TrainLoader:
    """Training batches for one data-parallel rank; see the module docstring for the order and state."""

    def __init__(self, cfg: Config, paths: Any, dp_rank: int = 0, dp_size: int = 1):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"TrainLoader: dp_rank {dp_rank} is not in [0, dp_size = {dp_size})")
        self.cfg = cfg
        self.manifest, self.index = _open_split(paths.train_manifest, cfg, paths, "training")
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
        return _Spec(self.manifest, self.index, self.seed, self.mode, self.seq_len,
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
        if "raw_slots" in self._state:  # contiguous mode: made JSON-able only when asked
            raw = {k: self._state.pop(k) for k in ("raw_slots", "raw_queue")}
            order = Order(self.manifest, self.index.doc_tokens, self.seed, shuffle=True)
            self._state.update(saved_carry(order, raw))
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
    """Packed validation batches in manifest order (no shuffling): the same on every call.
    The split is cut into groups of micro_batch rows of seq_len tokens. Without a limit every group is
    returned, rank d taking groups d, d + dp, ...; the last is padded (labels IGNORE_INDEX, doc id -1) where
    the split ends. With max_batches per rank below that, the dp * max_batches groups taken are spread
    evenly over the whole split, so that validation samples every document rather than the first one,
    and the same groups are taken at any dp that divides the total. Every rank returns the same number
    of batches and reads only its own rows."""
    if getattr(paths, "valid_manifest", None) is None:
        return []
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"valid_batches: dp_rank {dp_rank} is not in [0, dp_size = {dp_size})")
    manifest, index = _open_split(paths.valid_manifest, cfg, paths, "validation")
    m, T = cfg.parallel.micro_batch, cfg.model.seq_len
    order = Order(manifest, index.doc_tokens, seed=0, shuffle=False)
    reader = BlockReader(manifest, index)
    groups = math.ceil(math.ceil(manifest.tokens / T) / m)
    n = math.ceil(groups / dp_size)
    taken = n * dp_size
    if max_batches is not None and max_batches < n:
        n, taken = max_batches, max_batches * dp_size
    out = []
    for j in range(n):
        k = j * dp_size + dp_rank
        group = k if taken >= groups else k * groups // taken
        block = np.empty((3, m, T), dtype=np.int64)
        packed_rows(order, reader, group * m * T, block[0], block[1], block[2])
        t = torch.from_numpy(block)
        out.append({"input_ids": t[0], "labels": t[1], "doc_ids": t[2]})
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
