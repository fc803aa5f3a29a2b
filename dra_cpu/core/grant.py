"""grant(): a claim request -> the exact grant, as data. Pure.

Granting is the first of prepare's two steps: it computes the PreparedClaim without touching anything; the driver
then has the node made to match the ledger with it (reconciler.py), which rolls back if a step fails. Which pod the
claim serves is not part of the grant: core/sharing.py chooses it from the claim's reservedFor once the CPUs are
known (the CFS check needs their number), on every prepare, a repeated one included.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from dra_cpu.core.allocator import AllocationError, choose_cpus
from dra_cpu.core.claims import ClaimError, ClaimRef, ClaimRequest, DeviceResult
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import Device, DeviceType
from dra_cpu.core.ledger import ClaimMetadata, HugePageGrant, Ledger, MemoryGrant, PreparedClaim, PreparedDevice
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.node_view import NodeView
from dra_cpu.core.quantity import QuantityError, format_bytes, whole_quantity
from dra_cpu.core.topology import Topology


def grant(
    ledger: Ledger, request: ClaimRequest, view: NodeView, metadata: ClaimMetadata | None = None
) -> PreparedClaim:
    """The grant for `request` on the node `view` shows, or ClaimError with a reason a person can act on.
    Idempotent per claim uid. `metadata` is what the claim's device metadata files will name (None: it has none)."""
    lost = ledger.unrestorable.get(request.ref.uid)
    if lost is not None:
        raise ClaimError(
            f"claim {request.ref} was prepared on this node before the driver restarted and cannot be restored: "
            f"{lost.reason}. Delete its pod: the kubelet then unprepares the claim here"
        )
    devices = view.device_index
    existing = ledger.claims.get(request.ref.uid)
    if existing is not None:
        # A repeat keeps its grant and the pod it serves (core/sharing.py may hand it over after). It gains what it
        # could not know when loaded from an older record: device names, metadata names.
        named = existing if existing.named else _named(existing, request, devices)
        return named if named.metadata is not None or metadata is None else replace(named, metadata=metadata)
    settings = view.settings.devices
    taken = ledger.allocated_cpus
    held = ledger.allocated_hugepages
    memory = ledger.allocated_memory
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
            key = (device.numa_node, device.page_size_kib or device.step // 1024)
            size = _bytes(request.ref, result, device, settings.memory_capacity, held.get(key, 0), "hugepages")
            held[key] = held.get(key, 0) + size
            prepared.append(replace(base, hugepages=HugePageGrant(*key, size)))
            continue
        if device.type is DeviceType.MEMORY:
            used = memory.get(device.numa_node, 0)
            size = _bytes(request.ref, result, device, settings.memory_capacity, used, "memory")
            memory[device.numa_node] = used + size
            prepared.append(replace(base, memory=MemoryGrant(device.numa_node, size)))
            continue
        cpus = _cpus(ledger, request.ref, result, device, view.topology, taken, settings.cpu_capacity)
        taken |= cpus
        prepared.append(replace(base, cpus=cpus))
    claim = PreparedClaim(ref=request.ref, devices=tuple(prepared), metadata=metadata).with_binding(_binding(request))
    # The devices leave the floor's CPUs out (core/capacity.py): this refuses only what they could not foresee, a
    # claim prepared before the settings or the node changed that holds some of them.
    floor = settings.shared_floor
    shared = floor.pool(view.topology, taken)
    if claim.cpus - view.topology.isolated_cpus and len(shared) < floor.minimum:
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
            pages = next(
                (
                    h
                    for h in claim.hugepages
                    if (h.numa_node, h.page_size_kib) == (device.numa_node, device.page_size_kib)
                ),
                None,
            )
            named.append(replace(base, hugepages=pages))
        elif device.type is DeviceType.MEMORY:
            named.append(replace(base, memory=next((m for m in claim.memory if m.numa_node == device.numa_node), None)))
        else:
            named.append(replace(base, cpus=claim.cpus & device.cpus))
    return PreparedClaim(claim.ref, tuple(named), claim.pod_uids, claim.metadata, claim.memory_binding)


def _binding(request: ClaimRequest) -> MemoryBinding | None:
    """The claim's memoryBinding: one for the whole claim, since its containers get all of its devices."""
    chosen = {r.memory_binding for r in request.results if r.memory_binding is not None}
    if len(chosen) > 1:
        raise ClaimError(
            f"claim {request.ref}: its requests' CPUConfig set memoryBinding to "
            f"{' and '.join(sorted(b.value for b in chosen))}; a claim's memory is bound one way"
        )
    return chosen.pop() if chosen else None


def _cpus(
    ledger: Ledger,
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
            holder = ledger.holder_of(busy.first())
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


def _bytes(ref: ClaimRef, result: DeviceResult, device: Device, key: str, used: int, what: str) -> int:
    """The bytes of hugepages or memory a result consumed of `device` (its requestPolicy default when it recorded
    none), which must be whole steps and fit beside the `used` ones. Counted as CPUs are: the scheduler's view may
    be stale or wrong (a claim allocated against an older slice), and the node has what its device published."""
    raw = result.consumed_of(key)
    step = device.step
    try:
        size = whole_quantity(raw, f"consumedCapacity[{key!r}]") if raw is not None else step
    except QuantityError as err:
        raise ClaimError(f"claim {ref}: request {result.request!r} on {device.name}: {err}") from None
    if size % step:
        unit = f"{device.page_size_kib} KiB pages" if device.page_size_kib else f"{format_bytes(step)} steps"
        raise ClaimError(
            f"claim {ref}: request {result.request!r} on {device.name}: {raw} is not a whole number of {unit}"
        )
    free = max(0, device.capacity - used)
    if size > free:
        raise ClaimError(
            f"claim {ref}: request {result.request!r} on {device.name}: {format_bytes(size)} of {what} "
            f"requested, {format_bytes(free) if free else 'none'} of {format_bytes(device.capacity)} free"
        )
    return size
