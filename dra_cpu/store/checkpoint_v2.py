"""Checkpoint version 2, as drivers wrote it until version 3 came: read, never written any more.
Version 1 (store/checkpoint_v1.py) and, on every claim, what its device metadata files name
(core/ledger.ClaimMetadata), so that the files are derived from the checkpoint like the CDI specs are.

`ClaimV2.metadata` is null for a claim without device metadata files, else
`{"podClaimName": <name or null>, "requests": [<request name as allocated>, ...]}`. Devices and unrestorable
reports are as in version 1.

The header, which store/checkpoint.py frames for every version, gained `sequence` within version 2: the save's
number, one above the save before, by which load takes the newer of checkpoint.json and its spare. A file without it
(tests/fixtures/checkpoint/v2.json) reads as 0. A reader that does not know the field reads the file right; it reads
checkpoint.json alone, which after a power loss may be the save before the newest: downgrade after a clean stop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from dra_cpu.core.ledger import ClaimMetadata, PreparedClaim, Unrestorable
from dra_cpu.store import checkpoint_v1
from dra_cpu.store.checkpoint_v1 import DeviceV1

VERSION = 2


class MetadataV2(TypedDict):
    podClaimName: str | None
    requests: list[str]


class ClaimV2(TypedDict):
    namespace: str
    name: str
    uid: str
    podUIDs: list[str]
    devices: list[DeviceV1]
    metadata: MetadataV2 | None


def claim(record: Mapping[str, Any]) -> PreparedClaim:
    """A ClaimV2 as the ledger holds it; KeyError/TypeError/ValueError (or a DraCpuError of a value) when malformed."""
    metadata = record["metadata"]
    return PreparedClaim(
        checkpoint_v1.ref(record),
        checkpoint_v1.devices(record["devices"]),
        tuple(str(p) for p in record["podUIDs"]),
        None if metadata is None else _metadata(metadata),
    )


def _metadata(record: Mapping[str, Any]) -> ClaimMetadata:
    pod_claim = record["podClaimName"]
    return ClaimMetadata(None if pod_claim is None else str(pod_claim), tuple(str(r) for r in record["requests"]))


def unrestorable(record: Mapping[str, Any]) -> Unrestorable:
    return checkpoint_v1.unrestorable(record)
