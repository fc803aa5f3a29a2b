"""Checkpoint version 3, the one written now: version 2 (store/checkpoint_v2.py) and the memory of each claim
(issue 23): on every device the memory it was granted, on every claim how its containers' memory is bound.

`DeviceV3.memory` is null for a device without memory, else `{"numaNode": <node>, "bytes": <bytes>}`.
`ClaimV3.memoryBinding` is null for a claim bound as the default for what it holds (strict with memory, preferred
without: core/ledger.PreparedClaim.binding), else "strict" or "preferred". Metadata and unrestorable reports are as
in version 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypedDict

from dra_cpu.core.ledger import MemoryGrant, PreparedClaim, PreparedDevice, Unrestorable
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.store import checkpoint_v1, checkpoint_v2
from dra_cpu.store.checkpoint_v1 import DeviceV1, UnrestorableV1
from dra_cpu.store.checkpoint_v2 import MetadataV2

VERSION = 3


class MemoryV3(TypedDict):
    numaNode: int
    bytes: int


class DeviceV3(DeviceV1):
    memory: MemoryV3 | None


class ClaimV3(TypedDict):
    namespace: str
    name: str
    uid: str
    podUIDs: list[str]
    devices: list[DeviceV3]
    metadata: MetadataV2 | None
    memoryBinding: str | None


def claim(record: Mapping[str, Any]) -> PreparedClaim:
    """A ClaimV3 as the ledger holds it: what version 2 reads of it, with its memory; KeyError/TypeError/ValueError
    (or a DraCpuError of a value) when malformed."""
    read = checkpoint_v2.claim(record)
    devices = tuple(
        replace(d, memory=_memory(r["memory"])) for d, r in zip(read.devices, record["devices"], strict=True)
    )
    binding = record["memoryBinding"]
    return replace(read, devices=devices).with_binding(None if binding is None else MemoryBinding(binding))


def _memory(record: Mapping[str, Any] | None) -> MemoryGrant | None:
    return None if record is None else MemoryGrant(int(record["numaNode"]), int(record["bytes"]))


def unrestorable(record: Mapping[str, Any]) -> Unrestorable:
    return checkpoint_v1.unrestorable(record)


def claim_record(claim: PreparedClaim) -> ClaimV3:
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
        "memoryBinding": None if claim.memory_binding is None else claim.memory_binding.value,
    }


def _device(d: PreparedDevice) -> DeviceV3:
    return {
        "requestNames": list(d.request_names),
        "pool": d.pool,
        "device": d.device,
        "shareID": d.share_id,
        "cpus": str(d.cpus),
        "hugepages": None
        if d.hugepages is None
        else {"numaNode": d.hugepages.numa_node, "pageSizeKiB": d.hugepages.page_size_kib, "bytes": d.hugepages.bytes},
        "memory": None if d.memory is None else {"numaNode": d.memory.numa_node, "bytes": d.memory.bytes},
    }


def unrestorable_record(lost: Unrestorable) -> UnrestorableV1:
    return {"namespace": lost.ref.namespace, "name": lost.ref.name, "uid": lost.ref.uid, "reason": lost.reason}
