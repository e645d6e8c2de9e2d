"""Small shared pieces of the data pipeline: the error type, checksums, reading JSON."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fwl_scale.config import ConfigError


class DataError(ConfigError):
    """Bad data (a file, a shard, a manifest, a tokenizer). The message names the file or shard.

    A subclass of ConfigError so that `fwl` reports it as a clear error with a non-zero exit."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able object (what a build was made from)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: {what} is not valid JSON ({e})") from None
