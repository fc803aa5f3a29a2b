"""The ledger: the prepared claims and what each holds, the one truth from which everything the driver keeps on
the node is derived (core/desired.py), and restore(), which checks a ledger loaded from disk against the node. Pure.

A `PreparedClaim` records what a prepare granted (the CPUs and hugepages of each device), the pod it serves (chosen
and handed over by core/sharing.py), and what its device metadata files name (`ClaimMetadata`).
store/checkpoint.py writes the ledger to disk, in the wire format of its newest version (store/checkpoint_v*.py);
nothing here knows that format.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.quantity import format_bytes
from dra_cpu.core.topology import Topology, page_size_quantity


@dataclass(frozen=True)
class HugePageGrant:
    """Hugepages granted to one device of a claim: `bytes` of `page_size_kib` pages on NUMA node `numa_node`."""

    numa_node: int
    page_size_kib: int
    bytes: int


@dataclass(frozen=True)
class PreparedDevice:
    request_names: tuple[str, ...]
    pool: str
    device: str
    share_id: str | None = None
    cpus: CPUSet = field(default_factory=CPUSet)
    hugepages: HugePageGrant | None = None


@dataclass(frozen=True)
class ClaimMetadata:
    """What a claim's device metadata files (KEP-5304) name beyond its grant, recorded at prepare when the driver
    writes them: the pod's name for a claim made from its template (None for a claim the pod names) and the
    request names as the allocation gave them (`<request>/<subrequest>` for firstAvailable), one per request."""

    pod_claim_name: str | None
    requests: tuple[str, ...]


@dataclass(frozen=True)
class PreparedClaim:
    ref: ClaimRef
    devices: tuple[PreparedDevice, ...]
    # The pod whose containers may use the claim (core/sharing.py): one uid, or none while no reserving pod can.
    pod_uids: tuple[str, ...] = ()
    # None: the claim has no device metadata files (written with the feature off, or not known: see restore).
    metadata: ClaimMetadata | None = None

    @property
    def uid(self) -> str:
        return self.ref.uid

    @property
    def cpus(self) -> CPUSet:
        return CPUSet.union_all(d.cpus for d in self.devices)

    @property
    def hugepages(self) -> tuple[HugePageGrant, ...]:
        return tuple(d.hugepages for d in self.devices if d.hugepages is not None)

    @property
    def named(self) -> bool:
        """Whether every device is known by name: a claim rebuilt from its CDI spec knows only its CPUs and pages
        until the kubelet's next prepare of it names its devices again (core/grant.py)."""
        return all(d.device for d in self.devices)

    def mems(self, topology: Topology) -> CPUSet:
        """Memory nodes: those of the claim's CPUs and of its hugepages."""
        return topology.numa_nodes_of(self.cpus) | CPUSet.of(h.numa_node for h in self.hugepages)


@dataclass(frozen=True)
class Unrestorable:
    """A claim prepared before a restart that this node can no longer honour (see restore()). It holds nothing;
    it is remembered so that every prepare of it gets `reason` until the kubelet unprepares it."""

    ref: ClaimRef
    reason: str

    @property
    def uid(self) -> str:
        return self.ref.uid


@dataclass(frozen=True)
class Ledger:
    """The prepared claims by uid, and the claims dropped at start-up (Unrestorable) by uid; the two are disjoint."""

    claims: Mapping[str, PreparedClaim] = field(default_factory=dict)
    unrestorable: Mapping[str, Unrestorable] = field(default_factory=dict)

    def with_claim(self, claim: PreparedClaim) -> Ledger:
        return Ledger({**self.claims, claim.uid: claim}, self.unrestorable)

    def without(self, uid: str) -> Ledger:
        return Ledger(
            {k: v for k, v in self.claims.items() if k != uid},
            {k: v for k, v in self.unrestorable.items() if k != uid},
        )

    @property
    def allocated_cpus(self) -> CPUSet:
        return CPUSet.union_all(c.cpus for c in self.claims.values())

    @property
    def allocated_hugepages(self) -> dict[tuple[int, int], int]:
        """(NUMA node, page size KiB) -> bytes held by prepared claims."""
        return _hugepage_bytes(self.claims.values())

    def holder_of(self, cpu: int) -> PreparedClaim | None:
        return next((c for c in self.claims.values() if cpu in c.cpus), None)


def restore(claims: Iterable[PreparedClaim], topology: Topology, unrestorable: Iterable[Unrestorable] = ()) -> Ledger:
    """The ledger loaded from disk (checkpoint or CDI specs), checked against this node: what enters the process.

    Claims are taken in the order given (the checkpoint's, or the CDI folder's), and each is kept whole or not at
    all. A claim is dropped, as Unrestorable with the reason, when
    - one of its CPUs is not online here (the node shrank: a VM resized across a reboot, SMT turned off),
    - one of its hugepage grants names a NUMA node or page size this node no longer reserves,
    - one of its CPUs is already held by a claim kept before it (a double booking on disk: the first is kept),
    - its hugepages, added to those of the claims kept before it, exceed what the node reserves.
    The drop is loud (the driver logs each, a metric counts them, the kubelet's prepares get the reason); refusing
    to start instead would crash-loop the daemon and strand every other claim of the node.
    """
    online = topology.online_cpus
    pools = {(n.id, p.size_kib): p.total * p.size_bytes for n in topology.numa_nodes for p in n.hugepages}
    kept: dict[str, PreparedClaim] = {}
    dropped: dict[str, Unrestorable] = {u.uid: u for u in unrestorable}
    holders: dict[int, PreparedClaim] = {}
    held: dict[tuple[int, int], int] = {}
    for claim in claims:
        reason = _unrestorable_reason(claim, online, pools, holders, held)
        if reason:
            dropped[claim.uid] = Unrestorable(claim.ref, reason)
            continue
        kept[claim.uid] = claim
        dropped.pop(claim.uid, None)
        holders.update(dict.fromkeys(claim.cpus, claim))
        for key, size in _hugepage_bytes([claim]).items():
            held[key] = held.get(key, 0) + size
    return Ledger(kept, dropped)


def _unrestorable_reason(
    claim: PreparedClaim,
    online: CPUSet,
    pools: Mapping[tuple[int, int], int],
    holders: Mapping[int, PreparedClaim],
    held: Mapping[tuple[int, int], int],
) -> str:
    gone = claim.cpus - online
    if gone:
        return f"its CPU(s) {gone} are not online on this node any more (online: {online or 'none'})"
    busy = CPUSet.of(c for c in claim.cpus if c in holders)
    if busy:
        other = holders[busy.first()]
        return f"its CPU(s) {busy} are also held by claim {other.ref} (uid {other.uid}), which is kept"
    for (node, size_kib), size in _hugepage_bytes([claim]).items():
        what = f"its {format_bytes(size)} of {page_size_quantity(size_kib)} hugepages on NUMA node {node}"
        capacity = pools.get((node, size_kib))
        if capacity is None:
            return f"{what}: this node has no such hugepage pool any more"
        used = held.get((node, size_kib), 0)
        if used + size > capacity:
            return (
                f"{what}: with the {format_bytes(used) if used else '0'} held by claims kept before it, "
                f"that exceeds the {format_bytes(capacity) if capacity else '0'} reserved"
            )
    return ""


def _hugepage_bytes(claims: Iterable[PreparedClaim]) -> dict[tuple[int, int], int]:
    held: dict[tuple[int, int], int] = {}
    for claim in claims:
        for grant in claim.hugepages:
            key = (grant.numa_node, grant.page_size_kib)
            held[key] = held.get(key, 0) + grant.bytes
    return held
