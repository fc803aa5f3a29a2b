"""The prepared claims on disk: one JSON file, versioned and checksummed, with a spare that holds the save before.

Loaded before anything is served. Every save carries a sequence number one above the last, and load takes the spare
when it holds a newer intact save than checkpoint.json (see below). A checkpoint.json that fails its checksum or does
not parse is moved aside (never deleted: a person may want it) and the caller rebuilds the state from the driver's
own CDI specs.

Every save is durable before it returns, at the cost of one flush to the disk (the floor of a durable write). The
first save of a process makes a new file: temp file, fdatasync, rename over checkpoint.json, fsync of the folder.
Later saves write the new content into SPARE in place and fdatasync it, then swap SPARE and checkpoint.json (renameat2
RENAME_EXCHANGE), so that checkpoint.json names the newest save and SPARE the one before, which the next save
overwrites. The swap is not flushed: after a power loss the names may be those from before it, which the sequence
numbers make harmless (load picks the newer file whatever its name; a save only ever overwrites the file that holds
the older save, which no swap changes). A save so allocates and frees no inode and, at a steady size, no block (on
some disks a new inode alone costs more than the rest of the save). Where the exchange is unsupported, saves fall back
to a temp file, a rename and an fsync of the folder.

Drivers before the sequence numbers read checkpoint.json alone, which is the newest save except after a power loss
within the file system's commit interval of a save (seconds): downgrade only after a clean stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from dra_cpu.core.state import PreparedClaim, State, Unrestorable
from dra_cpu.errors import DraCpuError
from dra_cpu.store.fileio import EXCHANGE_UNSUPPORTED, exchange, fsync_dir, write_atomic, write_in_place
from dra_cpu.store.leftovers import remove_temp_files

VERSION = 1
FILENAME = "checkpoint.json"
SPARE = f".{FILENAME}.spare"
MODE = 0o600


class CheckpointError(DraCpuError):
    """The checkpoint exists but cannot be trusted."""


@dataclass(frozen=True)
class Checkpoint:
    """What was on disk: the prepared claims and the unrestorable reports (State.unrestorable), as read. They are
    trusted only after core/state.restore() has checked them against this node's topology."""

    state: State
    boot_id: str
    sequence: int = 0  # of the save that wrote it (0 before sequence numbers); save() gives its own


def encode(
    checkpoint: Checkpoint, cache: dict[str, tuple[PreparedClaim, str]] | None = None, sequence: int = 0
) -> bytes:
    """Compact JSON; the checksum covers the claims' exact bytes. `cache` keeps each claim's serialization between
    saves, so that a prepare costs one claim's encoding, not the whole node's."""
    parts = []
    for uid, claim in sorted(checkpoint.state.claims.items()):
        hit = cache.get(uid) if cache is not None else None
        if hit is None or hit[0] is not claim:
            hit = (claim, json.dumps(claim.to_dict(), sort_keys=True, separators=(",", ":")))
            if cache is not None:
                cache[uid] = hit
        parts.append(hit[1])
    if cache is not None:
        for uid in set(cache) - set(checkpoint.state.claims):
            del cache[uid]
    claims = "[" + ",".join(parts) + "]"
    lost = [u.to_dict() for _, u in sorted(checkpoint.state.unrestorable.items())]
    # Only when there are some: a file without them stays readable by drivers that predate the field.
    extra = _canonical(lost) if lost else ""
    header = json.dumps(
        {"version": VERSION, "bootID": checkpoint.boot_id, "checksum": _checksum(claims + extra), "sequence": sequence}
    )
    tail = f', "unrestorable": {extra}' if lost else ""
    return f'{header[:-1]}, "claims": {claims}{tail}}}\n'.encode()


def decode(data: bytes, origin: str) -> Checkpoint:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{origin}: not JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        version = doc.get("version") if isinstance(doc, dict) else None
        raise CheckpointError(f"{origin}: version {version!r}, expected {VERSION}")
    claims, lost = doc.get("claims"), doc.get("unrestorable")
    if (
        not isinstance(claims, list)
        or not isinstance(lost, list | None)
        or doc.get("checksum") != _checksum(_canonical(claims) + (_canonical(lost) if lost else ""))
    ):
        raise CheckpointError(f"{origin}: checksum mismatch: the file was changed or cut short")
    try:
        prepared = [PreparedClaim.from_dict(c) for c in claims]
        reports = [Unrestorable.from_dict(u) for u in lost or ()]
    except (KeyError, TypeError, ValueError, DraCpuError) as err:
        raise CheckpointError(f"{origin}: malformed claim record ({err!r})") from None
    twice = sorted(uid for uid, n in Counter(c.uid for c in prepared).items() if n > 1)
    if twice:
        raise CheckpointError(f"{origin}: claim {twice[0]} is listed twice")
    # Listed order is kept: restore() keeps the first of two claims that overlap.
    state = State({c.uid: c for c in prepared}, {u.uid: u for u in reports})
    sequence = doc.get("sequence", 0)
    return Checkpoint(state, str(doc.get("bootID", "")), sequence if isinstance(sequence, int) else 0)


def _canonical(claims: list[Any]) -> str:
    return "[" + ",".join(json.dumps(c, sort_keys=True, separators=(",", ":")) for c in claims) + "]"


def _checksum(claims: str) -> str:
    return "sha256:" + hashlib.sha256(claims.encode()).hexdigest()


@dataclass
class CheckpointFile:
    directory: Path
    _encoded: dict[str, tuple[PreparedClaim, str]] = field(default_factory=dict, repr=False)
    # The sequence number of this process's last save; None before its first.
    _sequence: int | None = field(default=None, repr=False)
    # SPARE may be overwritten in place only after a save of this process made checkpoint.json the newest file: before,
    # SPARE may hold the newest save (a killed process's swap never reached the disk). A failed save clears it.
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
        """The newest save; None when there is no checkpoint yet; CheckpointError (after moving the file aside) when
        checkpoint.json cannot be trusted. That file is never written in place, except through names that a power
        loss reverted (the swap of the save before had not reached the disk): then the reboot took the CDI specs as
        well, and the kubelet prepares every claim again, so that the caller's rebuild from them is right too."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            current = decode(data, str(self.path))
        except CheckpointError as err:
            aside = self.path.with_name(f"{FILENAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            self.path.rename(aside)
            raise CheckpointError(f"{err}; moved aside to {aside}") from None
        # Newer in the spare: the swap of its save had not reached the disk when the power went. A save cut short
        # leaves the spare torn, which is no error: it is not read then.
        spare = self._read(self.spare)
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
