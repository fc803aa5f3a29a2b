"""The ledger: the prepared claims and what each holds, the one truth from which everything the driver keeps on
the node is derived (core/desired.py), and restore(), which checks a ledger loaded from disk against the node. Pure.

A `PreparedClaim` records what a prepare granted (the CPUs, hugepages and memory of each device), how its memory is
bound (core/memory.py), the pod it serves (chosen and handed over by core/sharing.py), and what its device metadata
files name (`ClaimMetadata`).
store/checkpoint.py writes the ledger to disk, in the wire format of its newest version (store/checkpoint_v*.py);
nothing here knows that format.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TypeVar

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.quantity import format_bytes
from dra_cpu.core.topology import Topology, page_size_quantity

K = TypeVar("K")


@dataclass(frozen=True)
class HugePageGrant:
    """Hugepages granted to one device of a claim: `bytes` of `page_size_kib` pages on NUMA node `numa_node`."""

    numa_node: int
    page_size_kib: int
    bytes: int


@dataclass(frozen=True)
class MemoryGrant:
    """Memory granted to one device of a claim: `bytes` of NUMA node `numa_node`'s allocatable memory."""

    numa_node: int
    bytes: int


@dataclass(frozen=True)
class PreparedDevice:
    request_names: tuple[str, ...]
    pool: str
    device: str
    share_id: str | None = None
    cpus: CPUSet = field(default_factory=CPUSet)
    hugepages: HugePageGrant | None = None
    memory: MemoryGrant | None = None


@dataclass(frozen=True)
class ClaimMetadata:
    """What a claim's device metadata files (KEP-5304) name beyond its grant, recorded at prepare when the driver
    writes them: the pod's name for a claim made from its template (None for a claim the pod names) and the
    request names as the allocation gave them (`<request>/<subrequest>` for firstAvailable), one per request."""

    pod_claim_name: str | None
    requests: tuple[str, ...]

    @property
    def base_requests(self) -> tuple[str, ...]:
        """The requests' names without a subrequest: one folder and one CDI spec each."""
        return tuple(name.split("/", 1)[0] for name in self.requests)


@dataclass(frozen=True)
class PreparedClaim:
    ref: ClaimRef
    devices: tuple[PreparedDevice, ...]
    # The pod whose containers may use the claim (core/sharing.py): one uid, or none while no reserving pod can.
    pod_uids: tuple[str, ...] = ()
    # None: the claim has no device metadata files (written with the feature off, or not known: see restore).
    metadata: ClaimMetadata | None = None
    # As the claim's CPUConfig says (memoryBinding) where that is not the default for what it holds (`binding`);
    # None: the default. Recorded only then (`with_binding`), so that one binding has one record.
    memory_binding: MemoryBinding | None = None

    @property
    def uid(self) -> str:
        return self.ref.uid

    # Made once: a prepare reads it some eight times (the grant, its checks, the spec, the pins, the log).
    @cached_property
    def cpus(self) -> CPUSet:
        return CPUSet.union_all(d.cpus for d in self.devices)

    @property
    def hugepages(self) -> tuple[HugePageGrant, ...]:
        return tuple(d.hugepages for d in self.devices if d.hugepages is not None)

    @property
    def memory(self) -> tuple[MemoryGrant, ...]:
        return tuple(d.memory for d in self.devices if d.memory is not None)

    @property
    def binding(self) -> MemoryBinding:
        """Strict for a claim with memory (its bytes are counted per node), preferred for one without: a claim that
        holds no memory must not be an OOM trap (core/memory.py)."""
        return self.memory_binding or self._default_binding

    @property
    def _default_binding(self) -> MemoryBinding:
        return MemoryBinding.STRICT if self.memory else MemoryBinding.PREFERRED

    def with_binding(self, binding: MemoryBinding | None) -> PreparedClaim:
        """This claim bound as `binding` says (None: the default)."""
        return replace(self, memory_binding=None if binding is self._default_binding else binding)

    @property
    def named(self) -> bool:
        """Whether every device is known by name: a claim rebuilt from its CDI spec knows only its CPUs and pages
        until the kubelet's next prepare of it names its devices again (core/grant.py)."""
        return all(d.device for d in self.devices)

    def mems(self, topology: Topology) -> CPUSet:
        """The claim's memory nodes, where its containers' memory is bound or preferred (`binding`): those of its
        memory and hugepages; without memory, those of its CPUs and hugepages."""
        pages = self.hugepage_nodes
        if self.memory:
            return CPUSet.of(m.numa_node for m in self.memory) | pages
        return topology.numa_nodes_of(self.cpus) | pages

    @property
    def hugepage_nodes(self) -> CPUSet:
        return CPUSet.of(h.numa_node for h in self.hugepages)


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

    @property
    def allocated_memory(self) -> dict[int, int]:
        """NUMA node -> bytes of memory held by prepared claims."""
        return _memory_bytes(self.claims.values())

    def holder_of(self, cpu: int) -> PreparedClaim | None:
        return next((c for c in self.claims.values() if cpu in c.cpus), None)


def restore(
    claims: Iterable[PreparedClaim],
    topology: Topology,
    memory: Mapping[int, int],
    unrestorable: Iterable[Unrestorable] = (),
) -> Ledger:
    """The ledger loaded from disk (checkpoint or CDI specs), checked against this node: what enters the process.
    `memory`: NUMA node -> the memory claims may get there now (the capacity of its memory device).

    Claims are taken in the order given (the checkpoint's, or the CDI folder's), and each is kept whole or not at
    all. A claim is dropped, as Unrestorable with the reason, when
    - one of its CPUs is not online here (the node shrank: a VM resized across a reboot, SMT turned off),
    - one of its hugepage grants names a NUMA node or page size this node no longer reserves, or one of its memory
      grants a NUMA node without memory for claims,
    - one of its CPUs is already held by a claim kept before it (a double booking on disk: the first is kept),
    - its hugepages or memory, added to those of the claims kept before it, exceed what the node has for claims
      (the node's memory shrank, its hugepage pools grew, the admin reserved more).
    The drop is loud (the driver logs each, a metric counts them, the kubelet's prepares get the reason); refusing
    to start instead would crash-loop the daemon and strand every other claim of the node.
    """
    online = topology.online_cpus
    pools = {(n.id, p.size_kib): p.total * p.size_bytes for n in topology.numa_nodes for p in n.hugepages}
    kept: dict[str, PreparedClaim] = {}
    dropped: dict[str, Unrestorable] = {u.uid: u for u in unrestorable}
    holders: dict[int, PreparedClaim] = {}
    pages: dict[tuple[int, int], int] = {}
    used: dict[int, int] = {}
    for claim in claims:
        reason = _unrestorable_reason(claim, online, holders) or _over_capacity(claim, pages, pools, used, memory)
        if reason:
            dropped[claim.uid] = Unrestorable(claim.ref, reason)
            continue
        kept[claim.uid] = claim
        dropped.pop(claim.uid, None)
        holders.update(dict.fromkeys(claim.cpus, claim))
        _add(pages, _hugepage_bytes([claim]))
        _add(used, _memory_bytes([claim]))
    return Ledger(kept, dropped)


def _add(held: dict[K, int], more: Mapping[K, int]) -> None:
    for key, size in more.items():
        held[key] = held.get(key, 0) + size


def _unrestorable_reason(claim: PreparedClaim, online: CPUSet, holders: Mapping[int, PreparedClaim]) -> str:
    gone = claim.cpus - online
    if gone:
        return f"its CPU(s) {gone} are not online on this node any more (online: {online or 'none'})"
    busy = CPUSet.of(c for c in claim.cpus if c in holders)
    if busy:
        other = holders[busy.first()]
        return f"its CPU(s) {busy} are also held by claim {other.ref} (uid {other.uid}), which is kept"
    return ""


def _over_capacity(
    claim: PreparedClaim,
    pages: Mapping[tuple[int, int], int],
    pools: Mapping[tuple[int, int], int],
    used: Mapping[int, int],
    memory: Mapping[int, int],
) -> str:
    """Why the claim's pages or memory do not fit beside those (`pages`, `used`) of the claims kept before it."""
    for (node, size_kib), size in _hugepage_bytes([claim]).items():
        what = f"its {format_bytes(size)} of {page_size_quantity(size_kib)} hugepages on NUMA node {node}"
        capacity = pools.get((node, size_kib))
        reason = _exceeds(what, size, pages.get((node, size_kib), 0), capacity, "no such hugepage pool", "reserved")
        if reason:
            return reason
    for node, size in _memory_bytes([claim]).items():
        what = f"its {format_bytes(size)} of memory on NUMA node {node}"
        has = memory.get(node)
        reason = _exceeds(what, size, used.get(node, 0), has, "no memory for claims there", "it has for claims")
        if reason:
            return reason
    return ""


def _exceeds(what: str, size: int, used: int, capacity: int | None, missing: str, has: str) -> str:
    if capacity is None:
        return f"{what}: this node has {missing} any more"
    if used + size <= capacity:
        return ""
    return (
        f"{what}: with the {format_bytes(used) if used else '0'} held by claims kept before it, "
        f"that exceeds the {format_bytes(capacity) if capacity else '0'} {has}"
    )


def _hugepage_bytes(claims: Iterable[PreparedClaim]) -> dict[tuple[int, int], int]:
    held: dict[tuple[int, int], int] = {}
    for claim in claims:
        for grant in claim.hugepages:
            _add(held, {(grant.numa_node, grant.page_size_kib): grant.bytes})
    return held


def _memory_bytes(claims: Iterable[PreparedClaim]) -> dict[int, int]:
    held: dict[int, int] = {}
    for claim in claims:
        for grant in claim.memory:
            _add(held, {grant.numa_node: grant.bytes})
    return held
