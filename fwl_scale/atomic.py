"""Atomic file writes: the one way the project replaces a file that a reader, a resume or a re-run may
look at (checkpoint markers and pointers, shards and their sidecars, manifests, configs, reports).

The data goes to a temporary name beside the target (same directory, so the rename cannot cross a file
system), is fsynced, renamed over the target with os.replace, and the directory is fsynced so that the
rename itself survives a power loss. A reader therefore sees the old file or the new one, never a part;
and a file written after another (a marker after its data) is never on disk without the first.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def temp_path(path: str | Path) -> Path:
    """The temporary name `path` is written under before `commit` (hidden, and unique per process, so
    two writers never share one; an interrupted run leaves `.NAME.tmpPID` behind at most)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(path: str | Path) -> None:
    """Makes a rename inside directory `path` durable (a no-op where the platform cannot open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str | Path, path: str | Path) -> None:
    """Makes the finished temporary file `tmp` the file `path`: fsync, rename, fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` creates the file's content under the temporary name (e.g. `lambda p: torch.save(x, p)`);
    then it replaces `path` atomically. A failing `write` leaves `path` as it was and removes the temporary."""
    tmp = temp_path(path)
    try:
        write(tmp)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
