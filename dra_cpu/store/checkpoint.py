"""The prepared claims on disk: one JSON file, versioned and checksummed, replaced atomically.

Loaded before anything is served. A file that fails its checksum or does not parse is moved aside (never deleted:
a person may want it) and the caller rebuilds the state from the driver's own CDI specs.

Every save is durable before it returns (fdatasync of the new content, fsync of the folder after the name moved).
After the first save of a process, saves reuse a spare file instead of a new temp file: the new content is written
into SPARE in place and synced, then SPARE and checkpoint.json swap names in one atomic step (renameat2
RENAME_EXCHANGE), so that SPARE holds the previous checkpoint and is overwritten by the next save. Each save of a
prepare or unprepare then allocates and frees no inode and, at a steady size, no block: on some disks a new inode
alone costs more than the rest of the save. Where the exchange is unsupported, saves fall back to a temp file and
a rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
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


def encode(checkpoint: Checkpoint, cache: dict[str, tuple[PreparedClaim, str]] | None = None) -> bytes:
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
    header = json.dumps({"version": VERSION, "bootID": checkpoint.boot_id, "checksum": _checksum(claims + extra)})
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
    return Checkpoint(state, str(doc.get("bootID", "")))


def _canonical(claims: list[Any]) -> str:
    return "[" + ",".join(json.dumps(c, sort_keys=True, separators=(",", ":")) for c in claims) + "]"


def _checksum(claims: str) -> str:
    return "sha256:" + hashlib.sha256(claims.encode()).hexdigest()


@dataclass
class CheckpointFile:
    directory: Path
    _encoded: dict[str, tuple[PreparedClaim, str]] = field(default_factory=dict, repr=False)
    # SPARE may be overwritten only after a save of this process was made durable: before, the names on disk may
    # still be those from before an exchange that a killed process never synced, and SPARE would name what
    # checkpoint.json names after a power loss. A failed save clears it for the same reason.
    _spare_free: bool = field(default=False, repr=False)
    _exchange_works: bool = field(default=True, repr=False)

    @property
    def path(self) -> Path:
        return self.directory / FILENAME

    def load(self) -> Checkpoint | None:
        """None when there is no checkpoint yet; CheckpointError (after moving the file aside) when it is bad."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode(data, str(self.path))
        except CheckpointError as err:
            aside = self.path.with_name(f"{FILENAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            self.path.rename(aside)
            raise CheckpointError(f"{err}; moved aside to {aside}") from None

    def secure(self) -> None:
        """The folder is the driver's alone (0700): the checkpoint names every claim's pods and CPUs."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def remove_leftovers(self) -> list[Path]:
        """Temp files of saves killed before their rename (store/fileio.write_atomic names them
        `.checkpoint.json.<random>.tmp`); nothing else in the folder is touched."""
        return remove_temp_files(self.directory, FILENAME)

    @property
    def spare(self) -> Path:
        return self.directory / SPARE

    def save(self, checkpoint: Checkpoint) -> None:
        data = encode(checkpoint, self._encoded)
        if not self._spare_free:
            write_atomic(self.path, data, mode=MODE)
            self._spare_free = self._exchange_works
            return
        self._spare_free = False
        write_in_place(self.spare, data, MODE)
        try:
            exchange(self.spare, self.path)
        except OSError as err:
            if err.errno not in EXCHANGE_UNSUPPORTED:
                raise
            # The spare holds the new content, synced: a rename over the checkpoint completes this save as a temp
            # file's would, and the following saves make temp files.
            self._exchange_works = False
            os.replace(self.spare, self.path)
        fsync_dir(self.directory)
        self._spare_free = self._exchange_works
