"""Where shard files live: local paths, or webdataset's URL forms (`pipe:COMMAND`, `http://`, `https://`).

A split on object storage is named by the location of its manifest, e.g.

    data.train=[https://host/corpus/train/manifest.json]
    data.train=["pipe:aws s3 cp s3://bucket/corpus/train/manifest.json -"]

and its other files (shards, the document index) are found by replacing the last `manifest.json` in
that string with their names (`sibling`), so one rule serves a URL and a command alike.

Reads are retried (transient network or command failures: RETRIES attempts, BACKOFF_S doubling between
them); what still fails is a DataError naming the file and the last cause. An HTTP 4xx other than 408
and 429 is not retried: the file is not there, asking again will not change that. Byte ranges are
HTTP Range requests; a `pipe:` command cannot seek, so a range of it reads the whole file (the caller
caches it).
"""
from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from fwl_scale.data.common import DataError

URL_PREFIXES = ("pipe:", "http://", "https://")
MANIFEST = "manifest.json"
RETRIES = 4
BACKOFF_S = 0.5  # before the 2nd attempt; doubled before each later one
TIMEOUT_S = 60.0  # one HTTP request (connect or a stalled read)


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(URL_PREFIXES)


def sibling(location: str | Path, name: str) -> str | Path:
    """The location of file `name` beside the manifest at `location`."""
    if not is_url(location):
        return Path(location).parent / name
    assert isinstance(location, str)
    at = location.rfind(MANIFEST)
    if at < 0:
        raise DataError(f"{location}: a remote split is named by its {MANIFEST} (the shards are found beside "
                        f"it), and this location does not contain {MANIFEST!r}")
    return location[:at] + name + location[at + len(MANIFEST):]


class MissingFile(DataError):
    """The file is not there (HTTP 404 or 410, no such local file)."""


class _Permanent(Exception):
    """A failure that retrying cannot fix (HTTP 4xx, a file that is not there)."""

    def __init__(self, msg: str, missing: bool):
        super().__init__(msg)
        self.missing = missing


def _http(url: str, start: int | None, end: int | None) -> bytes:
    req = urllib.request.Request(url)
    if start is not None:
        req.add_header("Range", f"bytes={start}-{end - 1}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            body = resp.read()
            status = resp.status
            length = resp.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise _Permanent(f"HTTP {e.code} {e.reason}", missing=e.code in (404, 410)) from None
        raise
    if length is not None and len(body) != int(length):
        raise OSError(f"connection closed after {len(body)} of {length} bytes")
    if start is not None and status != 206:
        body = body[start:end]  # a server without Range support sends the whole file
    return body


def _pipe(command: str) -> bytes:
    proc = subprocess.run(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(f"command exited with status {proc.returncode}" + (f": {err[-1]}" if err else ""))
    return proc.stdout


def _local(path: str | Path, start: int | None, end: int | None) -> bytes:
    try:
        with open(path, "rb") as f:
            if start is None:
                return f.read()
            return os.pread(f.fileno(), end - start, start)
    except FileNotFoundError:
        raise _Permanent("missing", missing=True) from None


def fetch(location: str | Path, what: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of `location` (or bytes [start, end) of it), with retries; `what` names the file in
    errors, e.g. "shard https://host/train/shard-000003.tar"."""
    last: BaseException | None = None
    for attempt in range(RETRIES):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            if not is_url(location):
                return _local(location, start, end)  # no Path(): it costs more than a cached read
            assert isinstance(location, str)
            if location.startswith("pipe:"):
                data = _pipe(location[len("pipe:"):])
                return data if start is None else data[start:end]
            return _http(location, start, end)
        except _Permanent as e:
            raise (MissingFile if e.missing else DataError)(f"{what}: cannot read ({e})") from None
        except (OSError, urllib.error.URLError, ValueError) as e:
            last = e
    raise DataError(f"{what}: cannot read after {RETRIES} attempts ({type(last).__name__}: {last})")
