"""Checkpoint version 1, as drivers up to and including commit add498e wrote it: read, never written any more.

The file: `{"version": 1, "bootID": ..., "checksum": ..., "claims": [ClaimV1...], "unrestorable": [...]}`, the
checksum over the claims (and the unrestorable reports, when there are any) as store/checkpoint.py frames them.
`unrestorable` was added to version 1 without a new number: a writer left it out when it had no report, so that
earlier readers kept reading those files; files with and without it are both version 1.

Kept for good: a node upgraded from any of those drivers starts from the file they left
(tests/fixtures/checkpoint/v1*.json are such files).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.ledger import HugePageGrant, PreparedClaim, PreparedDevice, Unrestorable

VERSION = 1


class HugePagesV1(TypedDict):
    numaNode: int
    pageSizeKiB: int
    bytes: int


class DeviceV1(TypedDict):
    requestNames: list[str]
    pool: str
    device: str
    shareID: str | None
    cpus: str
    hugepages: HugePagesV1 | None


class ClaimV1(TypedDict):
    namespace: str
    name: str
    uid: str
    podUIDs: list[str]
    devices: list[DeviceV1]


class UnrestorableV1(TypedDict):
    namespace: str
    name: str
    uid: str
    reason: str


def claim(record: Mapping[str, Any]) -> PreparedClaim:
    """A ClaimV1 as the ledger holds it (no device metadata names: version 1 did not record them).
    KeyError/TypeError/ValueError (or a DraCpuError of a value) on a malformed record."""
    return PreparedClaim(ref(record), devices(record["devices"]), tuple(str(p) for p in record.get("podUIDs", ())))


def unrestorable(record: Mapping[str, Any]) -> Unrestorable:
    return Unrestorable(ref(record), str(record["reason"]))


def ref(record: Mapping[str, Any]) -> ClaimRef:
    return ClaimRef(namespace=str(record["namespace"]), name=str(record["name"]), uid=str(record["uid"]))


def devices(records: list[Mapping[str, Any]]) -> tuple[PreparedDevice, ...]:
    out = []
    for d in records:
        huge = d.get("hugepages")
        out.append(
            PreparedDevice(
                request_names=tuple(str(n) for n in d["requestNames"]),
                pool=str(d["pool"]),
                device=str(d["device"]),
                share_id=d.get("shareID"),
                cpus=CPUSet.parse(d["cpus"]),
                hugepages=None
                if huge is None
                else HugePageGrant(int(huge["numaNode"]), int(huge["pageSizeKiB"]), int(huge["bytes"])),
            )
        )
    return tuple(out)
