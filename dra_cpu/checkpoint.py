"""The prepared claims on disk: one JSON file, versioned and checksummed, replaced atomically.

Loaded before anything is served. A file that fails its checksum or does not parse is moved aside (never deleted:
a person may want it) and the caller rebuilds the state from the driver's own CDI specs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dra_cpu.errors import DraCpuError
from dra_cpu.fileio import write_atomic
from dra_cpu.state import PreparedClaim, State

VERSION = 1
FILENAME = "checkpoint.json"


class CheckpointError(DraCpuError):
    """The checkpoint exists but cannot be trusted."""


@dataclass(frozen=True)
class Checkpoint:
    state: State
    boot_id: str


def encode(checkpoint: Checkpoint) -> bytes:
    claims = [c.to_dict() for _, c in sorted(checkpoint.state.claims.items())]
    return (
        json.dumps(
            {"version": VERSION, "bootID": checkpoint.boot_id, "checksum": _checksum(claims), "claims": claims},
            indent=1,
            sort_keys=True,
        ).encode()
        + b"\n"
    )


def decode(data: bytes, origin: str) -> Checkpoint:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{origin}: not JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        version = doc.get("version") if isinstance(doc, dict) else None
        raise CheckpointError(f"{origin}: version {version!r}, expected {VERSION}")
    claims = doc.get("claims")
    if not isinstance(claims, list) or doc.get("checksum") != _checksum(claims):
        raise CheckpointError(f"{origin}: checksum mismatch: the file was changed or cut short")
    try:
        prepared = [PreparedClaim.from_dict(c) for c in claims]
    except (KeyError, TypeError, ValueError, DraCpuError) as err:
        raise CheckpointError(f"{origin}: malformed claim record ({err!r})") from None
    return Checkpoint(State({c.uid: c for c in prepared}), str(doc.get("bootID", "")))


def _checksum(claims: list[Any]) -> str:
    canonical = json.dumps(claims, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class CheckpointFile:
    directory: Path

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

    def save(self, checkpoint: Checkpoint) -> None:
        write_atomic(self.path, encode(checkpoint), mode=0o600)
