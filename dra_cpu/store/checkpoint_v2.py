"""Checkpoint version 2, the one written now: version 1 (store/checkpoint_v1.py) and, on every claim, what its
device metadata files name (core/ledger.ClaimMetadata), so that the files are derived from the checkpoint like the
CDI specs are.

`ClaimV2.metadata` is null for a claim without device metadata files, else
`{"podClaimName": <name or null>, "requests": [<request name as allocated>, ...]}`. Devices and unrestorable
reports are as in version 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

from dra_cpu.core.ledger import ClaimMetadata, PreparedClaim, PreparedDevice, Unrestorable
from dra_cpu.store import checkpoint_v1
from dra_cpu.store.checkpoint_v1 import DeviceV1, UnrestorableV1

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


def claim_record(claim: PreparedClaim) -> ClaimV2:
    metadata = claim.metadata
    return {
        "namespace": claim.ref.namespace,
        "name": claim.ref.name,
        "uid": claim.ref.uid,
        "podUIDs": list(claim.pod_uids),
        "devices": [_device(d) for d in claim.devices],
        "metadata": None
        if metadata is None
        else {"podClaimName": metadata.pod_claim_name, "requests": list(metadata.requests)},
    }


def _device(d: PreparedDevice) -> DeviceV1:
    return {
        "requestNames": list(d.request_names),
        "pool": d.pool,
        "device": d.device,
        "shareID": d.share_id,
        "cpus": str(d.cpus),
        "hugepages": None
        if d.hugepages is None
        else {"numaNode": d.hugepages.numa_node, "pageSizeKiB": d.hugepages.page_size_kib, "bytes": d.hugepages.bytes},
    }


def unrestorable_record(lost: Unrestorable) -> UnrestorableV1:
    return {"namespace": lost.ref.namespace, "name": lost.ref.name, "uid": lost.ref.uid, "reason": lost.reason}
