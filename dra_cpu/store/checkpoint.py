"""The prepared claims on disk: one JSON file, versioned and checksummed, with a spare that holds the save before.

Loaded before anything is served. Every save carries a sequence number one above the last, and load takes the newest
intact save of the two files (see below). A checkpoint.json that fails its checksum or does not parse is moved aside
(never deleted: a person may want it) and the caller decides what to load instead (CheckpointError.spare).

Every save is durable before it returns, at the cost of one flush to the disk (the floor of a durable write). The
first save of a process makes a new file: temp file, fdatasync, rename over checkpoint.json, fsync of the folder.
Later saves write the new content into SPARE in place and fdatasync it, then swap SPARE and checkpoint.json (renameat2
RENAME_EXCHANGE), so that checkpoint.json names the newest save and SPARE the one before, which the next save
overwrites. The swap is not flushed: after a power loss the names may be those from before it. That is harmless
because a save only ever writes into the file that holds the older of the two saves, whatever the names on the
disk, so that the newest save the caller was told of stays intact in the other one; load compares the sequence
numbers, not the names. A save so allocates and frees no inode and, at a steady size, no block (on some disks a new
inode alone costs more than the rest of the save). Where the exchange is unsupported, saves fall back to a temp
file, a rename and an fsync of the folder. docs/design.md, "State that survives anything", walks through the cases.

Versions: the wire format of each version lives in a module of its own (store/checkpoint_v1.py, ...), which turns
its records into the ledger's values and, for the newest, back. Every version ever written is read for good; only
the newest is written (VERSION). A file of a version this driver does not know (written by a newer driver, after
a downgrade) is not trusted: like a corrupt one it is moved aside and the ledger is rebuilt from the CDI specs,
loudly. How to add a version: docs/design.md, "The checkpoint's versions".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from dra_cpu.core.ledger import Ledger, PreparedClaim, Unrestorable
from dra_cpu.errors import DraCpuError
from dra_cpu.store import checkpoint_v1, checkpoint_v2, checkpoint_v3
from dra_cpu.store.fileio import EXCHANGE_UNSUPPORTED, exchange, fsync_dir, write_atomic, write_in_place
from dra_cpu.store.leftovers import remove_temp_files

FILENAME = "checkpoint.json"
SPARE = f".{FILENAME}.spare"
MODE = 0o600


class _Reader(Protocol):
    """A version's module, as decode() reads it."""

    VERSION: int

    def claim(self, record: Mapping[str, Any]) -> PreparedClaim: ...

    def unrestorable(self, record: Mapping[str, Any]) -> Unrestorable: ...


READERS: Mapping[int, _Reader] = {m.VERSION: m for m in (checkpoint_v1, checkpoint_v2, checkpoint_v3)}
"""Every version ever written, by number."""
WRITER = checkpoint_v3
VERSION = WRITER.VERSION
"""The version every save writes."""


class CheckpointError(DraCpuError):
    """The checkpoint exists but cannot be trusted. `spare`, when checkpoint.json was torn (TornCheckpoint): the
    intact save the spare holds, if any, which is the save before the last one, or the last one itself when a power
    loss undid its swap and the next save's write tore checkpoint.json."""

    def __init__(self, message: str, spare: Checkpoint | None = None) -> None:
        super().__init__(message)
        self.spare = spare


class TornCheckpoint(CheckpointError):
    """Not JSON, or its checksum does not hold: cut short or overwritten part way (or changed by someone)."""


@dataclass(frozen=True)
class Checkpoint:
    """What was on disk: the ledger (prepared claims and unrestorable reports) as read, and the version it was read
    from. Trusted only after core/ledger.restore() has checked it against this node's topology."""

    ledger: Ledger
    boot_id: str
    version: int = VERSION
    sequence: int = 0  # of the save that wrote it (0: written before sequence numbers); save() gives its own


def encode(
    checkpoint: Checkpoint, cache: dict[str, tuple[PreparedClaim, str]] | None = None, sequence: int = 0
) -> bytes:
    """The newest version, compact JSON; the checksum covers the claims' exact bytes. `cache` keeps each claim's
    serialization between saves, so that a prepare costs one claim's encoding, not the whole node's. `sequence`
    (when above 0) numbers the save."""
    parts = []
    for uid, claim in sorted(checkpoint.ledger.claims.items()):
        hit = cache.get(uid) if cache is not None else None
        if hit is None or hit[0] is not claim:
            hit = (claim, _compact(WRITER.claim_record(claim)))
            if cache is not None:
                cache[uid] = hit
        parts.append(hit[1])
    if cache is not None:
        for uid in set(cache) - set(checkpoint.ledger.claims):
            del cache[uid]
    claims = "[" + ",".join(parts) + "]"
    lost = [unrestorable_record(u) for _, u in sorted(checkpoint.ledger.unrestorable.items())]
    # Only when there are some: version 1 files without them stayed readable by drivers that predate the field.
    extra = _canonical(lost) if lost else ""
    fields = {"version": VERSION, "bootID": checkpoint.boot_id, "checksum": _checksum(claims + extra)}
    header = json.dumps({**fields, "sequence": sequence} if sequence else fields)
    tail = f', "unrestorable": {extra}' if lost else ""
    return f'{header[:-1]}, "claims": {claims}{tail}}}\n'.encode()


def decode(data: bytes, origin: str) -> Checkpoint:
    """Any version ever written; CheckpointError naming what is wrong."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TornCheckpoint(f"{origin}: not JSON ({err})") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    reader = READERS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None
    if reader is None:
        known = ", ".join(str(v) for v in sorted(READERS))
        raise CheckpointError(f"{origin}: version {version!r}, expected {known} (a newer driver's file?)")
    claims, lost = doc.get("claims"), doc.get("unrestorable")
    if (
        not isinstance(claims, list)
        or not isinstance(lost, list | None)
        or doc.get("checksum") != _checksum(_canonical(claims) + (_canonical(lost) if lost else ""))
    ):
        raise TornCheckpoint(f"{origin}: checksum mismatch: the file was changed or cut short")
    try:
        prepared = [reader.claim(c) for c in claims]
        reports = [reader.unrestorable(u) for u in lost or ()]
    except (KeyError, TypeError, ValueError, AttributeError, DraCpuError) as err:
        raise CheckpointError(f"{origin}: malformed claim record ({err!r})") from None
    twice = sorted(uid for uid, n in Counter(c.uid for c in prepared).items() if n > 1)
    if twice:
        raise CheckpointError(f"{origin}: claim {twice[0]} is listed twice")
    # Listed order is kept: restore() keeps the first of two claims that overlap.
    ledger = Ledger({c.uid: c for c in prepared}, {u.uid: u for u in reports})
    sequence = doc.get("sequence", 0)
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
        raise CheckpointError(f"{origin}: sequence {sequence!r}, expected a whole number")
    return Checkpoint(ledger, str(doc.get("bootID", "")), reader.VERSION, sequence)


def claim_record(claim: PreparedClaim) -> dict[str, Any]:
    """One claim in the wire format the checkpoint is written in now (for tools that pass claims between
    processes, as the crash test's worker does)."""
    return dict(WRITER.claim_record(claim))


def claim_from_record(record: Mapping[str, Any]) -> PreparedClaim:
    return WRITER.claim(record)


def unrestorable_record(lost: Unrestorable) -> dict[str, Any]:
    """One unrestorable report in the wire format the checkpoint is written in now."""
    return dict(WRITER.unrestorable_record(lost))


def _compact(record: Any) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _canonical(records: list[Any]) -> str:
    return "[" + ",".join(_compact(r) for r in records) + "]"


def _checksum(claims: str) -> str:
    return "sha256:" + hashlib.sha256(claims.encode()).hexdigest()


@dataclass
class CheckpointFile:
    directory: Path
    _encoded: dict[str, tuple[PreparedClaim, str]] = field(default_factory=dict, repr=False)
    # The sequence number of this process's last save; None before its first.
    _sequence: int | None = field(default=None, repr=False)
    # SPARE may be overwritten in place only after a save of this process made checkpoint.json the newest file
    # (the first save's rename, flushed with its folder): before, SPARE may hold the newest save, whose swap a
    # killed process never flushed. A failed save clears it for the same reason.
    _spare_free: bool = field(default=False, repr=False)
    _exchange_works: bool = field(default=True, repr=False)

    # Made once: building a Path is a good part of a save's own CPU time.
    @cached_property
    def path(self) -> Path:
        return self.directory / FILENAME

    @cached_property
    def spare(self) -> Path:
        return self.directory / SPARE

    def load(self) -> Checkpoint | None:
        """The newest intact save of checkpoint.json and SPARE (checkpoint.json when they tie); None when there is
        no checkpoint yet. CheckpointError, after moving checkpoint.json aside, when that file cannot be trusted;
        the error carries the spare's save, if intact, for the caller to weigh (see CheckpointError)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        # A save cut short leaves the spare torn, which is no error: it holds no save the caller was told of.
        spare = self._read(self.spare)
        try:
            current = decode(data, str(self.path))
        except CheckpointError as err:
            aside = self.path.with_name(f"{FILENAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            self.path.rename(aside)
            raise CheckpointError(
                f"{err}; moved aside to {aside}", spare if isinstance(err, TornCheckpoint) else None
            ) from None
        return spare if spare is not None and spare.sequence > current.sequence else current

    def secure(self) -> None:
        """The folder is the driver's alone (0700): the checkpoint names every claim's pods and CPUs."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def remove_leftovers(self) -> list[Path]:
        """Temp files of saves killed before their rename (store/fileio.write_atomic names them
        `.checkpoint.json.<random>.tmp`); nothing else in the folder is touched."""
        return remove_temp_files(self.directory, FILENAME)

    def save(self, checkpoint: Checkpoint) -> None:
        if self._sequence is None:
            on_disk = [c.sequence for c in (self._read(self.path), self._read(self.spare)) if c is not None]
            self._sequence = max(on_disk, default=0)
        sequence = self._sequence + 1
        data = encode(checkpoint, self._encoded, sequence)
        if not self._spare_free:
            write_atomic(self.path, data, mode=MODE)
            self._sequence, self._spare_free = sequence, self._exchange_works
            return
        self._spare_free = False
        created = not self.spare.exists()
        try:
            write_in_place(self.spare, data, MODE)
            if created:
                fsync_dir(self.directory)  # the name of a new file must last as long as its content
            try:
                exchange(self.spare, self.path)
            except OSError as err:
                if err.errno not in EXCHANGE_UNSUPPORTED:
                    raise
                # The spare holds the new content, synced: a rename over the checkpoint (made durable) completes
                # this save as a temp file's would, and the following saves make temp files.
                self._exchange_works = False
                os.replace(self.spare, self.path)
                fsync_dir(self.directory)
        except OSError:
            # The spare may hold this save, complete: a later load must not take a save that failed.
            with contextlib.suppress(OSError):
                os.truncate(self.spare, 0)
            raise
        self._sequence, self._spare_free = sequence, self._exchange_works

    @staticmethod
    def _read(path: Path) -> Checkpoint | None:
        """The save in `path` when it is intact."""
        try:
            return decode(path.read_bytes(), str(path))
        except (OSError, CheckpointError):
            return None
