"""The prepared claims and what they hold, and decide(): a claim request -> the exact grant, as data. Pure.

decide() is the first of prepare's two steps: it computes the PreparedClaim without touching anything; the driver
then applies it (checkpoint, CDI, enforcement) and rolls back if a step fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dra_cpu.core.allocator import AllocationError, choose_cpus
from dra_cpu.core.capacity import DEFAULT_FLOOR, SharedFloor
from dra_cpu.core.claims import ClaimError, ClaimRef, ClaimRequest, DeviceResult
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import Device, DeviceType
from dra_cpu.core.quantity import QuantityError, format_bytes, whole_quantity
from dra_cpu.core.topology import Topology, page_size_quantity

SHARING_ADVICE = (
    "dra-cpu does not share a claim's CPUs across pods (use one claim per pod, e.g. a ResourceClaimTemplate)"
)
"""Why a claim used by several pods is refused: at prepare (reservedFor lists several pods) and by enforcement."""


@dataclass(frozen=True)
class HugePageGrant:
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
class PreparedClaim:
    ref: ClaimRef
    devices: tuple[PreparedDevice, ...]
    pod_uids: tuple[str, ...] = ()

    @property
    def uid(self) -> str:
        return self.ref.uid

    @property
    def cpus(self) -> CPUSet:
        return CPUSet.union_all(d.cpus for d in self.devices)

    @property
    def hugepages(self) -> tuple[HugePageGrant, ...]:
        return tuple(d.hugepages for d in self.devices if d.hugepages is not None)

    def mems(self, topology: Topology) -> CPUSet:
        """Memory nodes: those of the claim's CPUs and of its hugepages."""
        return topology.numa_nodes_of(self.cpus) | CPUSet.of(h.numa_node for h in self.hugepages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.ref.namespace,
            "name": self.ref.name,
            "uid": self.ref.uid,
            "podUIDs": list(self.pod_uids),
            "devices": [
                {
                    "requestNames": list(d.request_names),
                    "pool": d.pool,
                    "device": d.device,
                    "shareID": d.share_id,
                    "cpus": str(d.cpus),
                    "hugepages": None
                    if d.hugepages is None
                    else {
                        "numaNode": d.hugepages.numa_node,
                        "pageSizeKiB": d.hugepages.page_size_kib,
                        "bytes": d.hugepages.bytes,
                    },
                }
                for d in self.devices
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreparedClaim:
        """Inverse of to_dict; KeyError/TypeError/ValueError on a malformed record (the checkpoint reports those)."""
        devices = []
        for d in data["devices"]:
            huge = d.get("hugepages")
            devices.append(
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
        return cls(
            ref=ClaimRef(namespace=str(data["namespace"]), name=str(data["name"]), uid=str(data["uid"])),
            devices=tuple(devices),
            pod_uids=tuple(str(p) for p in data.get("podUIDs", ())),
        )


@dataclass(frozen=True)
class Unrestorable:
    """A claim prepared before a restart that this node can no longer honour (see restore()). It holds nothing;
    it is remembered so that every prepare of it gets `reason` until the kubelet unprepares it."""

    ref: ClaimRef
    reason: str

    @property
    def uid(self) -> str:
        return self.ref.uid

    def to_dict(self) -> dict[str, Any]:
        return {"namespace": self.ref.namespace, "name": self.ref.name, "uid": self.ref.uid, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Unrestorable:
        ref = ClaimRef(namespace=str(data["namespace"]), name=str(data["name"]), uid=str(data["uid"]))
        return cls(ref, str(data["reason"]))


@dataclass(frozen=True)
class State:
    claims: Mapping[str, PreparedClaim] = field(default_factory=dict)
    # Claim uid -> why it was dropped at start-up; disjoint from `claims`.
    unrestorable: Mapping[str, Unrestorable] = field(default_factory=dict)

    def with_claim(self, claim: PreparedClaim) -> State:
        return State({**self.claims, claim.uid: claim}, self.unrestorable)

    def without(self, uid: str) -> State:
        return State(
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

    def shared_cpus(self, topology: Topology) -> CPUSet:
        """Where every container without a claim runs: online CPUs that are neither claimed nor isolated."""
        return topology.online_cpus - topology.isolated_cpus - self.allocated_cpus


def restore(claims: Iterable[PreparedClaim], topology: Topology, unrestorable: Iterable[Unrestorable] = ()) -> State:
    """The state loaded from disk (checkpoint or CDI specs), checked against this node: what enters the process.

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
    return State(kept, dropped)


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


def decide(
    state: State,
    request: ClaimRequest,
    topology: Topology,
    devices: Mapping[str, Device],
    *,
    cpu_capacity: str,
    memory_capacity: str,
    floor: SharedFloor = DEFAULT_FLOOR,
) -> PreparedClaim:
    """The grant for `request`, or ClaimError with a reason a person can act on. Idempotent per claim uid."""
    lost = state.unrestorable.get(request.ref.uid)
    if lost is not None:
        raise ClaimError(
            f"claim {request.ref} was prepared on this node before the driver restarted and cannot be restored: "
            f"{lost.reason}. Delete its pod: the kubelet then unprepares the claim here"
        )
    existing = state.claims.get(request.ref.uid)
    if existing is not None:
        # A repeat keeps the pods it was prepared for: a pod added to reservedFor since is refused by enforcement.
        return existing if all(d.device for d in existing.devices) else _named(existing, request, devices)
    pods = sorted(set(request.pod_uids))
    if len(pods) > 1:
        raise ClaimError(f"claim {request.ref} is reserved for {len(pods)} pods ({', '.join(pods)}); {SHARING_ADVICE}")
    taken = state.allocated_cpus
    held = state.allocated_hugepages
    prepared: list[PreparedDevice] = []
    for result in request.results:
        device = devices.get(result.device)
        if device is None:
            raise ClaimError(
                f"claim {request.ref}: device {result.device!r} (request {result.request!r}) is not published by "
                f"this node (devices: {', '.join(sorted(devices))})"
            )
        base = PreparedDevice(
            request_names=(result.base_request,), pool=result.pool, device=device.name, share_id=result.share_id
        )
        if device.type is DeviceType.HUGEPAGES:
            grant = _hugepages(request.ref, result, device, memory_capacity, held)
            key = (grant.numa_node, grant.page_size_kib)
            held[key] = held.get(key, 0) + grant.bytes
            prepared.append(replace(base, hugepages=grant))
            continue
        cpus = _cpus(state, request.ref, result, device, topology, taken, cpu_capacity)
        taken |= cpus
        prepared.append(replace(base, cpus=cpus))
    claim = PreparedClaim(ref=request.ref, devices=tuple(prepared), pod_uids=request.pod_uids)
    # The devices leave the floor's CPUs out (core/capacity.py): this refuses only what they could not foresee, a
    # claim prepared before the settings or the node changed that holds some of them.
    shared = floor.pool(topology, taken)
    if claim.cpus - topology.isolated_cpus and len(shared) < floor.minimum:
        raise ClaimError(
            f"claim {request.ref}: taking CPUs {claim.cpus} would leave {len(shared)} shared CPU(s) "
            f"({shared or 'none'}); at least {floor.minimum} must stay for containers without claims"
        )
    return claim


def _named(claim: PreparedClaim, request: ClaimRequest, devices: Mapping[str, Device]) -> PreparedClaim:
    """A claim rebuilt from its CDI spec knows its CPUs and pages but not which device holds them: the kubelet's
    repeated prepare names the devices again, and the grant stays exactly what it was."""
    named = []
    for result in request.results:
        device = devices.get(result.device)
        base = PreparedDevice((result.base_request,), result.pool, result.device, result.share_id)
        if device is None:
            named.append(base)
        elif device.type is DeviceType.HUGEPAGES:
            grant = next(
                (
                    h
                    for h in claim.hugepages
                    if (h.numa_node, h.page_size_kib) == (device.numa_node, device.page_size_kib)
                ),
                None,
            )
            named.append(replace(base, hugepages=grant))
        else:
            named.append(replace(base, cpus=claim.cpus & device.cpus))
    return PreparedClaim(claim.ref, tuple(named), claim.pod_uids or request.pod_uids)


def _cpus(
    state: State,
    ref: ClaimRef,
    result: DeviceResult,
    device: Device,
    topology: Topology,
    taken: CPUSet,
    cpu_capacity: str,
) -> CPUSet:
    if not device.capacity:
        # Individual mode: the scheduler chose the CPU itself; it must still be free here.
        busy = device.cpus & taken
        if busy:
            holder = state.holder_of(busy.first())
            raise ClaimError(
                f"claim {ref}: CPU {busy} of device {device.name} is already prepared for "
                f"{'claim ' + str(holder.ref) if holder else 'another request of this claim'}"
            )
        return device.cpus
    raw = result.consumed_of(cpu_capacity)
    if raw is None:
        raise ClaimError(
            f"claim {ref}: result for request {result.request!r} on {device.name} has no "
            f"consumedCapacity[{cpu_capacity!r}] (is the DRAConsumableCapacity feature gate on?)"
        )
    try:
        count = whole_quantity(raw, f"consumedCapacity[{cpu_capacity!r}]")
        if count % device.step:
            # The device's requestPolicy has the scheduler round up to whole cores: an allocation that did not was
            # made against other slices (or by hand), and would split a core.
            raise AllocationError(
                f"{count} CPUs is not a whole number of cores of {device.step} threads, as the device's "
                "requestPolicy asks (wholeCores)"
            )
        return choose_cpus(topology, device.cpus - taken, count, result.policy, device.cpus)
    except (QuantityError, AllocationError) as err:
        raise ClaimError(f"claim {ref}: request {result.request!r} on {device.name}: {err}") from None


def _hugepages(
    ref: ClaimRef, result: DeviceResult, device: Device, memory_capacity: str, held: Mapping[tuple[int, int], int]
) -> HugePageGrant:
    raw = result.consumed_of(memory_capacity)
    page = device.step
    try:
        size = whole_quantity(raw, f"consumedCapacity[{memory_capacity!r}]") if raw is not None else page
    except QuantityError as err:
        raise ClaimError(f"claim {ref}: request {result.request!r} on {device.name}: {err}") from None
    if size % page:
        raise ClaimError(
            f"claim {ref}: request {result.request!r} on {device.name}: {raw} is not a whole number of "
            f"{device.page_size_kib} KiB pages"
        )
    grant = HugePageGrant(numa_node=device.numa_node, page_size_kib=device.page_size_kib or page // 1024, bytes=size)
    # Counted as CPUs are: the scheduler's view may be stale or wrong (a claim allocated against an older slice),
    # and the pages are reserved per node, so what is granted here must fit what the node reserved.
    free = max(0, device.capacity - held.get((grant.numa_node, grant.page_size_kib), 0))
    if size > free:
        raise ClaimError(
            f"claim {ref}: request {result.request!r} on {device.name}: {format_bytes(size)} of hugepages "
            f"requested, {format_bytes(free) if free else 'none'} of {format_bytes(device.capacity)} free"
        )
    return grant


def _hugepage_bytes(claims: Iterable[PreparedClaim]) -> dict[tuple[int, int], int]:
    held: dict[tuple[int, int], int] = {}
    for claim in claims:
        for grant in claim.hugepages:
            key = (grant.numa_node, grant.page_size_kib)
            held[key] = held.get(key, 0) + grant.bytes
    return held
