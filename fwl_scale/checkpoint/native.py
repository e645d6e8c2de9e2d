"""The native checkpoint: DeepSpeed's tag directories with our marker and pointer; finding, checking and
saving/restoring them (keep-last-k, resume).

Layout under <out_dir>/checkpoints/:

    step_00000200/            one DeepSpeed tag directory (engine.save_checkpoint, all ranks)
        mp_rank_00_model_states.pt, [zero / bf16 optimizer shards], COMPLETE.json
    step_00000100.damaged/    a checkpoint found damaged at a resume, set aside (never deleted by us)
    latest_complete           our pointer: the tag of the newest complete checkpoint

A save writes the tag directory, waits for every rank, then rank 0 writes COMPLETE.json (what was saved:
step, model config, layout, and the size and sha256 of every file) and only then replaces `latest_complete`
atomically (fwl_scale/atomic.py). A crash in the middle of a save therefore leaves a directory without
COMPLETE.json, which is never resumed from and is removed by the next successful save. DeepSpeed's own
`latest` file is not written (save_latest=False) and never trusted.

Checksums. Each rank hashes the files it wrote (read back from disk once they are closed, so the record is
of what the disk holds), the lists are gathered and rank 0 puts them into the marker: the marker stays
the one file that says "complete", and a checkpoint cannot be complete without its record. sha256, not a
faster non-cryptographic hash: it is in the standard library (no new dependency), runs at 1-2 GB/s per
core where the CPU has SHA instructions, the ranks share the work, and a user can check a file by hand
with `sha256sum`. A resume verifies the newest checkpoint across all ranks (each a share of the files,
the results gathered, so every rank decides the same) and falls back to the newest intact one; the
damaged ones are set aside as `<tag>.damaged`, out of the resume's and the pruning's way, and kept. A
checkpoint the user names (`fwl eval`, `--resume-from`, conversion) is verified too, and a damaged one is
an error naming the file: no fallback, since the user chose it. Checkpoints written before the checksums
existed load unverified.

A failed write (a full disk) in the middle of a save does not raise inside DeepSpeed's save, where the
other ranks would wait for the failed one at DeepSpeed's barriers until the collective timeout: it is
recorded, the rank writes nothing more, every rank learns of it at the next agreement point, the partial
directory is removed (its space released) and every rank raises CheckpointWriteError; the previous
checkpoint stays the newest complete one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from fwl_scale import __version__
from fwl_scale.atomic import atomic_write_json, atomic_write_text, fsync_dir
from fwl_scale.config import Config, ConfigError, config_to_nested
from fwl_scale.signal_points import FailingFile, fault_due, signal_point

CHECKPOINT_DIR = "checkpoints"
POINTER = "latest_complete"
MARKER = "COMPLETE.json"
TAG_RE = re.compile(r"^step_(\d{8,})$")
FORMAT = 1
HASH = "sha256"  # the checksum of every file, recorded in the marker (why sha256: the module docstring)
DAMAGED_SUFFIX = ".damaged"  # a damaged checkpoint set aside: step_00000200.damaged (no longer a tag)
# Threads hashing one process's files: hashlib releases the GIL on large buffers, so reads and hashes of
# several files overlap; a few are enough to keep up with a disk.
HASH_THREADS = 4


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt, or from another model); the
    message names it. A ConfigError so that `fwl` reports it cleanly with a non-zero exit."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, a failing device); the message names the
    rank, the step, the file and, for a lack of space, the space needed and free. The partial save is
    removed and the previous checkpoint is still the newest complete one."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class CheckpointRef:
    root: Path  # the checkpoints directory (DeepSpeed's save_dir)
    tag: str
    meta: dict[str, Any]  # COMPLETE.json

    @property
    def path(self) -> Path:
        return self.root / self.tag

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    """COMPLETE.json of a tag directory, or None when it has none (an interrupted save)."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {tag_dir}: {MARKER} is corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "step" not in meta or "model" not in meta:
        raise CheckpointError(f"checkpoint {tag_dir}: {MARKER} is not a fwl_scale checkpoint marker "
                              f"(format {FORMAT} expected)")
    return meta


def _complete_tags(root: Path) -> list[tuple[int, str]]:
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = TAG_RE.match(child.name)
            if m and child.is_dir() and (child / MARKER).is_file():
                found.append((int(m.group(1)), child.name))
    return sorted(found)


def _check_pointer(root: Path) -> str | None:
    """The tag our pointer names (None without a pointer). A pointer naming a missing or incomplete
    directory is an error (never silently train from scratch over a run that had checkpoints)."""
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    tag_dir = root / tag
    if not TAG_RE.match(tag) or not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint pointer {pointer} names {tag!r}, but {tag_dir} does not exist; "
                              "restore it or remove the pointer to choose another checkpoint")
    if not (tag_dir / MARKER).is_file():
        raise CheckpointError(f"checkpoint pointer {pointer} names {tag_dir}, which has no {MARKER} "
                              "(an incomplete save)")
    return tag


def find_latest(root: Path) -> CheckpointRef | None:
    """The newest complete checkpoint under `root` (a checkpoints directory), by our pointer; None if
    there is none. A pointer naming a missing or incomplete directory is an error (never silently
    train from scratch over a run that had checkpoints). Its files are not verified here: a resume
    takes the newest intact one (CheckpointManager.resume_point), a named one is verified by
    resolve_checkpoint."""
    tag = _check_pointer(root)
    if tag is not None:
        meta = read_marker(root / tag)
        if meta is None:  # removed since _check_pointer looked
            raise CheckpointError(f"checkpoint {root / tag}: its {MARKER} disappeared while it was read")
        # A crash between a marker and the pointer update leaves a newer complete checkpoint behind.
        newer = [t for s, t in _complete_tags(root) if s > int(meta["step"])]
        if newer:
            return CheckpointRef(root, newer[-1], read_marker(root / newer[-1]) or {})
        return CheckpointRef(root, tag, meta)
    # No pointer: a crash between the first marker and the first pointer write; complete directories
    # are still safe to use.
    tags = _complete_tags(root)
    if not tags:
        return None
    tag = tags[-1][1]
    return CheckpointRef(root, tag, read_marker(root / tag) or {})


# ------------------------------------------------------------------------------------ checksums
def checkpoint_files(tag_dir: Path) -> list[str]:
    """Every file of a tag directory but its marker, as names relative to it ('/'-separated)."""
    return sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file() and
                  p.relative_to(tag_dir).as_posix() != MARKER)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def _in_threads(fn: Callable[[str], Any], names: list[str]) -> list[Any]:
    if len(names) <= 1:
        return [fn(n) for n in names]
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(names))) as pool:
        return list(pool.map(fn, names))


def hash_files(tag_dir: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{name: {"bytes": size, "sha256": hex digest}} of files of `tag_dir`, as a marker records them.
    Raises OSError when one cannot be read."""
    def one(name: str) -> tuple[str, dict[str, Any]]:
        path = tag_dir / name
        return name, {"bytes": path.stat().st_size, HASH: _sha256(path)}

    return dict(_in_threads(one, sorted(set(names))))


def file_problems(tag_dir: Path, recorded: dict[str, Any], names: Iterable[str] | None = None) -> list[str]:
    """What is wrong with the files `names` (default: all) of `tag_dir` against their record in the marker,
    one line per damaged file naming it: missing, another size, another checksum, unreadable. Empty when
    they are intact."""
    def one(name: str) -> str | None:
        path = tag_dir / name
        entry = recorded.get(name)
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get(HASH), str)):
            return f"{path}: its record in {MARKER} is malformed"
        try:
            size = path.stat().st_size
            if size != entry["bytes"]:
                return f"{path}: {size} bytes, {entry['bytes']} when it was saved"
            if _sha256(path) != entry[HASH]:
                return f"{path}: its {HASH} differs from the one recorded when it was saved"
        except FileNotFoundError:
            return f"{path}: missing"
        except OSError as e:
            return f"{path}: cannot be read ({e.strerror or e})"
        return None

    return [p for p in _in_threads(one, sorted(recorded if names is None else names)) if p is not None]


def recorded_files(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The marker's record of every file (name -> bytes, sha256); None for a checkpoint saved before
    fwl_scale recorded them (loaded unverified)."""
    files = meta.get("files")
    return files if isinstance(files, dict) else None


def _damage_summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
    return problems[0] + more


def verify_checkpoint(ref: CheckpointRef) -> bool:
    """Checks every file of a checkpoint against the checksums its marker recorded, in this process.
    Raises CheckpointError naming the first damaged file; returns False for a checkpoint without
    checksums (saved before fwl_scale recorded them: nothing to check), True when all match."""
    recorded = recorded_files(ref.meta)
    if recorded is None:
        return False
    problems = file_problems(ref.path, recorded)
    if problems:
        raise CheckpointError(f"checkpoint {ref.path} is damaged: {_damage_summary(problems)}; it is not used")
    return True


def resolve_checkpoint(path: str | Path, verify: bool = True) -> CheckpointRef:
    """A user-given checkpoint: a run's out_dir, its checkpoints directory, or one tag directory. `verify`:
    its files are checked against their checksums, and a damaged one is an error naming the file — the
    user chose this checkpoint, so there is no falling back to another one."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: no such file or directory")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p}: not a directory (give a run directory, its "
                              f"{CHECKPOINT_DIR}/ directory or a step_* directory)")
    ref = None
    if (p / MARKER).exists() or TAG_RE.match(p.name):
        meta = read_marker(p)
        if meta is None:
            raise CheckpointError(f"checkpoint {p}: no {MARKER}; the save did not complete or this is not "
                                  "a fwl_scale checkpoint")
        ref = CheckpointRef(p.parent, p.name, meta)
    else:
        for root in (p / CHECKPOINT_DIR, p):
            if root.is_dir() and ((root / POINTER).exists() or _complete_tags(root)):
                ref = find_latest(root)
                if ref is not None:
                    break
    if ref is None:
        raise CheckpointError(f"checkpoint {p}: no complete fwl_scale checkpoint found there")
    if verify:
        try:
            verify_checkpoint(ref)
        except CheckpointError as e:
            older = [t for s, t in _complete_tags(ref.root) if s < ref.step]
            hint = (f" An older checkpoint of this run, if intact, can be named instead: {ref.root / older[-1]}"
                    if older else "")
            raise CheckpointError(f"{e}.{hint}") from None
    return ref


def _diff(a: Any, b: Any, prefix: str, default: Any = None) -> list[str]:
    """Differences between a checkpoint's model config `a` and `b`. A field the checkpoint lacks (written
    before the field existed) is compared as its `default`: the behaviour the checkpoint was trained with."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        defaults = default if isinstance(default, dict) else {}
        for k in sorted(set(a) | set(b)):
            d = defaults.get(k, "<absent>")
            out += _diff(a.get(k, d), b.get(k, "<absent>"), f"{prefix}.{k}", d)
        return out
    return [] if a == b else [f"{prefix}: {a!r} in the checkpoint, {b!r} in the config"]


# Model fields that leave the parameters as they are: how the same function is computed, and fwl.step_scale,
# the multiplier of the learned step sizes that evaluates a trained FWL with its fast updates off (0).
_COMPUTE_ONLY = {"fwl.chunk_size", "fwl.form", "fwl.vocab_chunk", "fwl.step_scale"}


def check_compatible(ref: CheckpointRef, cfg: Config, dp: int | None = None) -> None:
    """Raises CheckpointError if the checkpoint was written for another model (shape or function) or
    a layout it cannot be loaded into."""
    saved = dict(ref.meta.get("model", {}))
    current = config_to_nested(cfg)["model"]
    diffs = [d for d in _diff(saved, current, "model", config_to_nested(Config())["model"])
             if d.split(":")[0].removeprefix("model.") not in _COMPUTE_ONLY]
    if diffs:
        raise CheckpointError(f"checkpoint {ref.path} belongs to another model: " + "; ".join(diffs[:6]))
    if ref.meta.get("universal"):
        return  # a layout-free checkpoint (fwl ckpt convert): any layout, ZeRO stage and precision
    if dp is not None:
        p = cfg.parallel
        layout = ref.meta.get("layout") or {}
        for axis, current_size in (("tp", p.tp), ("pp", p.pp)):
            saved_size = layout.get(axis, 1)
            if saved_size != current_size:
                raise CheckpointError(
                    f"checkpoint {ref.path} was saved with parallel.{axis}={saved_size}, the config has "
                    f"{current_size}: its shards do not fit this layout. Convert it first (with as many processes "
                    f"as it was saved by, which `fwl ckpt convert` starts itself): fwl ckpt convert {ref.path} "
                    f"NEW_RUN_DIR, then resume with --resume-from NEW_RUN_DIR")
        # ZeRO shards the optimizer over DeepSpeed's data-parallel group, dp × cp.
        saved_dp = ref.meta.get("dp") * layout.get("cp", 1) if ref.meta.get("dp") is not None else None
        dp = dp * p.cp
        saved_zero = ref.meta.get("zero_stage")
        if saved_zero is not None and saved_zero != cfg.parallel.zero_stage:
            raise CheckpointError(f"checkpoint {ref.path} was saved with parallel.zero_stage={saved_zero}, the "
                                  f"config has {cfg.parallel.zero_stage}; resume with the same ZeRO stage")
        if saved_zero and saved_dp != dp:
            raise CheckpointError(f"checkpoint {ref.path} holds ZeRO-{saved_zero} optimizer shards for {saved_dp} "
                                  f"data-parallel ranks (dp × cp); resuming with {dp} needs a conversion first: "
                                  f"fwl ckpt convert {ref.path} NEW_RUN_DIR, then resume with --resume-from "
                                  "NEW_RUN_DIR (or resume with the same data-parallel size)")
        if ref.meta.get("bf16") is not None and ref.meta["bf16"] != cfg.train.bf16:
            raise CheckpointError(f"checkpoint {ref.path} was saved with train.bf16={ref.meta['bf16']}, the "
                                  f"config has {cfg.train.bf16}; the optimizer state differs between the two")


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (a barrier too)."""
    world = _world_size()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if _world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _shares(recorded: dict[str, Any], world: int) -> list[list[str]]:
    """A checkpoint's files split over `world` ranks for verifying, largest first onto the rank with the
    fewest bytes so far. It depends on the marker alone, so every rank computes the same split."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    sizes = {n: e["bytes"] if isinstance(e, dict) and isinstance(e.get("bytes"), int) else 0
             for n, e in recorded.items()}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (loads[i], i))
        shares[r].append(name)
        loads[r] += sizes[name]
    return shares


def _dir_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of `path` (or of its nearest existing parent); None if unknown."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _free_name(path: Path) -> Path:
    """`path`, or path2, path3, ... : the first name not taken."""
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}{n}")
    return candidate


def _os_error(error: BaseException) -> OSError | None:
    """The failed write behind an error of torch.save: the error itself, the OSError that torch's zip writer
    turned into a RuntimeError ("unexpected pos ..."), or the errno whose text a RuntimeError quotes
    (torch's writes through a file descriptor: "write(): fd 3 failed with No space left on device")."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        if os.strerror(code) in str(error):
            return OSError(code, os.strerror(code))
    return None


@dataclass
class WriteFailure:
    """A write of a save that failed on one rank (gathered to every rank, so plain fields only)."""

    rank: int
    path: str
    code: int | None  # errno; None when the error gave none
    reason: str

    @classmethod
    def of(cls, rank: int, error: BaseException, path: str | Path) -> "WriteFailure":
        os_error = _os_error(error)
        if os_error is None:
            return cls(rank, str(path), None, f"{type(error).__name__}: {str(error)[:300]}")
        return cls(rank, str(os_error.filename or path), os_error.errno, os_error.strerror or str(os_error))

    @property
    def out_of_space(self) -> bool:
        return self.code in (errno.ENOSPC, errno.EDQUOT)


class _RecordingWriter:
    """Stands in for DeepSpeed's checkpoint engine (engine.checkpoint_engine) during one save. It records
    each file this rank writes, to be hashed afterwards, and turns a failed write into a recorded failure
    instead of an exception inside DeepSpeed's save: the rank then writes nothing more but still passes
    DeepSpeed's own barriers, so no rank waits for it until the collective timeout, and every rank learns
    of the failure together when the save returns. Everything else is DeepSpeed's engine's."""

    def __init__(self, inner: Any, rank: int):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.inner = inner
        self.rank = rank
        self.written: list[Path] = []
        self.failure: WriteFailure | None = None
        # DeepSpeed's plain engine is torch.save, which takes an open file as well as a path. Given a
        # Python file, a failed write raises OSError with its errno (ENOSPC); given a path, torch's own
        # zip writer reports a full disk as "unexpected pos" with no errno at all.
        self.through_python_file = type(inner) is TorchCheckpointEngine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        if self.failure is not None:
            return  # the disk is full (or failing): more writes would fail too, or fill it up for others
        try:
            fault = fault_due("ckpt_write")
            if self.through_python_file:
                with open(path, "wb") as f:
                    self.inner.save(state_dict, FailingFile(f, fault) if fault else f)
            elif fault:
                raise OSError(fault, os.strerror(fault), path)
            else:
                self.inner.save(state_dict, path)
        except (OSError, RuntimeError) as e:
            self.failure = WriteFailure.of(self.rank, e, path)
            return
        self.written.append(Path(path))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        if self.failure is not None:
            return
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.failure = WriteFailure.of(self.rank, e, path)


@dataclass
class SkippedCheckpoint:
    """A damaged checkpoint that a resume passed over."""

    path: Path  # where it was
    problem: str  # the first damaged file and what is wrong with it (and how many more)
    kept_as: Path  # where it is now, kept for inspection


@dataclass
class ResumePoint:
    """What a resume starts from: the newest intact complete checkpoint, and the damaged newer ones."""

    ref: CheckpointRef | None  # None: the run has no checkpoint yet (a fresh start)
    skipped: list[SkippedCheckpoint] = field(default_factory=list)
    verified: bool = True  # False: saved before fwl_scale recorded checksums, so loaded unverified


class CheckpointManager:
    """Saves and restores training checkpoints of one run directory (all ranks call save/load and the
    collective checks: resume_point, verify)."""

    def __init__(self, out_dir: Path, keep_last: int, rank: int):
        self.root = Path(out_dir) / CHECKPOINT_DIR
        self.keep_last = keep_last
        self.rank = rank

    def latest(self) -> CheckpointRef | None:
        return find_latest(self.root)

    # ---------------------------------------------------------------------------------- verifying
    def _problems(self, tag_dir: Path, recorded: dict[str, Any]) -> list[str]:
        """The damaged files of one checkpoint, checked by all ranks together: each rank reads a share of
        the files and the findings are gathered, so every rank returns the same list and decides the same
        (and a large checkpoint is read once, in parallel, not once per rank)."""
        world = _world_size()
        mine = _shares(recorded, world)[self.rank if world > 1 else 0]
        found = _all_gather(file_problems(tag_dir, recorded, mine))
        return sorted(p for ps in found for p in ps)

    def verify(self, ref: CheckpointRef) -> bool:
        """Collective: checks a checkpoint the user named. A damaged one raises CheckpointError naming the
        file (no fallback: the user chose it); False when it has no checksums (an older fwl_scale's)."""
        recorded = recorded_files(ref.meta)
        if recorded is None:
            return False
        problems = self._problems(ref.path, recorded)
        if problems:
            raise CheckpointError(f"checkpoint {ref.path} is damaged: {_damage_summary(problems)}; it is not used")
        return True

    def _candidates(self) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        """Rank 0: every complete checkpoint, newest first, as (tag, marker, None) or (tag, None, what is
        wrong with its marker)."""
        _check_pointer(self.root)  # a pointer naming a missing or incomplete directory stays an error
        out: list[tuple[str, dict[str, Any] | None, str | None]] = []
        for _, tag in reversed(_complete_tags(self.root)):
            try:
                meta = read_marker(self.root / tag)
            except CheckpointError as e:
                out.append((tag, None, str(e)))
                continue
            if meta is not None:
                out.append((tag, meta, None))
        return out

    def resume_point(self) -> ResumePoint:
        """Collective: the newest complete checkpoint whose files match their checksums. Newer damaged ones
        are skipped and set aside (`_set_aside`), never deleted; with no intact one left among several
        checkpoints it is an error (never train from scratch over a run that had checkpoints)."""
        listing: Any = None
        if self.rank == 0:  # one listing for every rank: all of them weigh the same directories
            try:
                listing = self._candidates()
            except CheckpointError as e:
                listing = str(e)
        listing = _from_rank0(listing)
        if isinstance(listing, str):
            raise CheckpointError(listing)
        damaged: list[tuple[str, list[str]]] = []
        for tag, meta, marker_problem in listing:
            if marker_problem is not None:
                damaged.append((tag, [marker_problem]))
                continue
            recorded = recorded_files(meta)
            problems = [] if recorded is None else self._problems(self.root / tag, recorded)
            if problems:
                damaged.append((tag, problems))
                continue
            chosen = CheckpointRef(self.root, tag, meta)
            skipped = self._set_aside(damaged, chosen) if damaged else []
            return ResumePoint(chosen, skipped, verified=recorded is not None)
        if damaged:
            listed = "; ".join(f"{self.root / tag}: {_damage_summary(p)}" for tag, p in damaged)
            raise CheckpointError(f"no intact checkpoint to resume from in {self.root}: {listed}. Nothing was moved "
                                  "or removed; restore the damaged files, or train into another train.out_dir")
        return ResumePoint(None)

    def _set_aside(self, damaged: list[tuple[str, list[str]]], chosen: CheckpointRef) -> list[SkippedCheckpoint]:
        """Collective: rank 0 renames the damaged checkpoints newer than `chosen` to <tag>.damaged, where
        they are kept for inspection: no longer a tag, so no resume, `fwl eval RUN` or pruning sees them,
        and the run can save that step again. The pointer names `chosen` first, so that a failure half-way
        leaves the rest to be found again by the next resume."""
        outcome: Any = None
        if self.rank == 0:
            try:
                atomic_write_text(self.root / POINTER, chosen.tag + "\n")
                moved = []
                for tag, _ in damaged:
                    dest = _free_name(self.root / f"{tag}{DAMAGED_SUFFIX}")
                    (self.root / tag).rename(dest)
                    moved.append(dest)
                fsync_dir(self.root)
                outcome = moved
            except OSError as e:
                outcome = (f"damaged checkpoint(s) {', '.join(t for t, _ in damaged)} in {self.root} could not be "
                           f"set aside ({e}); resuming from {chosen.path} would save over them. Move them away by hand")
        outcome = _from_rank0(outcome)
        if isinstance(outcome, str):
            raise CheckpointError(outcome)
        return [SkippedCheckpoint(self.root / tag, _damage_summary(problems), dest)
                for (tag, problems), dest in zip(damaged, outcome)]

    # ------------------------------------------------------------------------------------- saving
    def save(self, engine, step: int, client_state: dict[str, Any], cfg: Config, dp: int,
             write_extra: Callable[[Path], Iterable[Path] | None] | None = None) -> CheckpointRef:
        """`write_extra(tag_dir)`: per-rank files that belong to the checkpoint (the carried FWL state),
        written by every rank after DeepSpeed's files and before the checkpoint is marked complete; it
        returns the paths it wrote, which that rank hashes with its DeepSpeed files.

        A failed write on any rank (OSError: a full disk, a quota, a failing device) ends the save on every
        rank with CheckpointWriteError, after the same agreement points as a good save (no rank is left
        waiting): the partial directory is removed and the previous checkpoint stays the newest complete one."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        existing = read_marker(tag_dir) if tag_dir.is_dir() else None
        if existing is not None:
            # Already saved at this step (never overwrite a complete checkpoint); make it the latest.
            _barrier()
            if self.rank == 0:
                atomic_write_text(self.root / POINTER, tag + "\n")
            _barrier()
            return CheckpointRef(self.root, tag, existing)
        _barrier()
        failure: WriteFailure | None = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tag_dir.exists():  # left by an interrupted save of the same step
                    shutil.rmtree(tag_dir)
                tag_dir.mkdir()
            except OSError as e:
                failure = WriteFailure.of(0, e, tag_dir)
        failures = [f for f in _all_gather(failure) if f is not None]  # and the directory is there
        written: list[dict[str, Any]] = []
        if not failures:
            gathered = _all_gather(self._write_files(engine, tag_dir, client_state, write_extra))
            failures = [f for f, _ in gathered if f is not None]  # every rank's files are written and hashed
            written = [files for _, files in gathered]
        if failures:
            raise self._write_failed(step, tag_dir, failures)
        signal_point("ckpt_data")
        meta = {
            "format": FORMAT,
            "step": step,
            "tag": tag,
            "time": time.time(),
            "fwl_scale": __version__,
            "world_size": _world_size(),
            "dp": dp,
            "zero_stage": cfg.parallel.zero_stage,
            "bf16": cfg.train.bf16,
            "config_name": cfg.name,
            "model": config_to_nested(cfg)["model"],
            # What `fwl ckpt convert` needs to rebuild the engine that wrote this checkpoint.
            "layout": {"tp": cfg.parallel.tp, "cp": cfg.parallel.cp, "dp": dp, "pp": cfg.parallel.pp},
            "config": config_to_nested(cfg),
        }
        if self.rank == 0:
            try:
                meta["files"] = self._record(tag_dir, written)
                atomic_write_json(tag_dir / MARKER, meta)
                signal_point("ckpt_marker")
                atomic_write_text(self.root / POINTER, tag + "\n")
                signal_point("ckpt_pointer")
            except OSError as e:
                failure = WriteFailure.of(0, e, tag_dir / MARKER)
            else:
                self._prune(tag)
        failures = [f for f in _all_gather(failure) if f is not None]
        if failures:
            raise self._write_failed(step, tag_dir, failures)
        return CheckpointRef(self.root, tag, meta)

    def _write_files(self, engine, tag_dir: Path, client_state: dict[str, Any],
                     write_extra: Callable[[Path], Iterable[Path] | None] | None
                     ) -> tuple[WriteFailure | None, dict[str, Any]]:
        """This rank's part of a save: DeepSpeed's files, `write_extra`'s, then the checksums of what this
        rank wrote. Returns (the failed write or None, {name: record} of this rank's files)."""
        writer = _RecordingWriter(engine.checkpoint_engine, self.rank)
        engine.checkpoint_engine = writer
        try:
            engine.save_checkpoint(str(self.root), tag=tag_dir.name, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as e:
            # A write DeepSpeed makes past its checkpoint engine (ZeRO's recovery scripts, beside the tag
            # directories). In one process it is a failed save like any other; with several, this rank left
            # DeepSpeed's sequence of collectives somewhere unknown, so it stops here at once and the other
            # ranks' next collective fails on its absence.
            if _world_size() > 1 or _os_error(e) is None:
                raise
            writer.failure = writer.failure or WriteFailure.of(self.rank, e, self.root)
        finally:
            engine.checkpoint_engine = writer.inner
        if writer.failure is not None:
            return writer.failure, {}
        paths = list(writer.written)
        try:
            if write_extra is not None:
                paths += [Path(p) for p in (write_extra(tag_dir) or [])]
        except (OSError, RuntimeError) as e:
            if _os_error(e) is None:
                raise  # not a failed write: a bug, with its traceback
            return WriteFailure.of(self.rank, e, tag_dir), {}
        names = []
        for p in paths:
            try:
                names.append(p.relative_to(tag_dir).as_posix())
            except ValueError:
                continue  # not a file of this checkpoint
        try:
            return None, hash_files(tag_dir, names)
        except OSError as e:
            return WriteFailure.of(self.rank, e, tag_dir), {}

    def _record(self, tag_dir: Path, written: list[dict[str, Any]]) -> dict[str, Any]:
        """Rank 0: the marker's record of every file, from each rank's list. A file that no rank reported
        (written by DeepSpeed outside its checkpoint engine) is hashed here, so the record covers the whole
        directory."""
        files: dict[str, Any] = {}
        for part in written:
            files.update(part)
        files.update(hash_files(tag_dir, [n for n in checkpoint_files(tag_dir) if n not in files]))
        return dict(sorted(files.items()))

    def _write_failed(self, step: int, tag_dir: Path, failures: list[WriteFailure]) -> CheckpointWriteError:
        """The error every rank raises after a failed save. Rank 0 first removes the partial directory and
        writes the one full message: the rank, step and file, and for a lack of space the space needed
        (the previous checkpoint's size) and free; the other ranks' messages point at it."""
        first = failures[0]
        if self.rank != 0:
            return CheckpointWriteError(f"rank {self.rank}: checkpoint of step {step} not saved: a write failed on "
                                        f"rank {first.rank}; rank 0's message names the file and the space needed")
        partial = _dir_bytes(tag_dir)
        (tag_dir / MARKER).unlink(missing_ok=True)  # first: a removal cut short leaves no "complete" directory
        shutil.rmtree(tag_dir, ignore_errors=True)
        released = partial - (_dir_bytes(tag_dir) if tag_dir.exists() else 0)
        try:
            previous = find_latest(self.root)
        except CheckpointError:
            previous = None
        others = f" (and on {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
        msg = (f"rank {first.rank}: checkpoint of step {step} not saved: writing {first.path} failed: "
               f"{first.reason}{others}.")
        if first.out_of_space:
            free = _free_bytes(self.root)
            free_text = f"{free:,} bytes ({_human(free)})" if free is not None else "an unknown amount"
            if previous is not None:
                need = _dir_bytes(previous.path)
                msg += (f" It needs about {need:,} bytes ({_human(need)}, the size of the previous checkpoint); "
                        f"{free_text} are free on that file system.")
            else:
                msg += (f" It needs more than the {partial:,} bytes ({_human(partial)}) it had written; {free_text} "
                        "are free on that file system.")
        msg += f" The partial save {tag_dir} was removed ({released:,} bytes released)"
        if tag_dir.exists():
            msg += ", but not entirely: remove what is left of it by hand"
        if previous is not None:
            msg += (f"; the newest complete checkpoint is still {previous.path} (step {previous.step}), which the "
                    "next run resumes from")
        msg += ". Free some space (or raise the quota) and run again." if first.out_of_space else "."
        return CheckpointWriteError(msg)

    def _prune(self, newest: str) -> None:
        """Keeps the newest `keep_last` complete checkpoints; removes older ones and the leftovers of
        interrupted saves (directories without a marker)."""
        complete = [t for _, t in _complete_tags(self.root)]
        keep = set(complete[-self.keep_last:]) | {newest}
        for child in self.root.iterdir():
            if not TAG_RE.match(child.name) or not child.is_dir() or child.name in keep:
                continue
            shutil.rmtree(child, ignore_errors=True)

    def load(self, engine, ref: CheckpointRef) -> dict[str, Any]:
        """Restores model, optimizer, scheduler into the engine; returns our client state."""
        try:
            load_path, client_state = engine.load_checkpoint(str(ref.root), tag=ref.tag, load_module_strict=True)
        except (RuntimeError, OSError, KeyError, ValueError, AssertionError, EOFError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ref.path} cannot be loaded (corrupt or from another model): "
                                  f"{type(e).__name__}: {str(e)[:400]}") from None
        if load_path is None or client_state is None:
            raise CheckpointError(f"checkpoint {ref.path}: DeepSpeed found no loadable state in it")
        if "fwl_step" not in client_state:
            raise CheckpointError(f"checkpoint {ref.path}: no fwl_scale training state in it")
        return client_state
