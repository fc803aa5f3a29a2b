"""Hypothesis strategies for the core's values: machines, device settings, claim requests and streams of them.

Machines are built as core Topology values directly (no sysfs): NUMA nodes of whole cores with SMT of width 1 or 2,
one or two L3 groups per node, some CPUs offline, per-node hugepage pools of 2Mi and 1Gi pages, and a little memory
per node beside them (tens of MiB, so that claims of memory run out of it).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import reject
from hypothesis import strategies as st

from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.capacity import settings_problems
from dra_cpu.core.claims import ClaimRef, ClaimRequest, DeviceResult, PodRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import Device, DeviceConfig, DeviceMode, DeviceType, GroupBy, build_devices
from dra_cpu.core.ledger import HugePageGrant, MemoryGrant, PreparedClaim, PreparedDevice
from dra_cpu.core.memory import MEMORY_STEP, MemoryBinding, ReservedMemory, allocatable_memory, parse_reserved_memory
from dra_cpu.core.topology import Cpu, HugePagePool, NumaNode, Topology

DRIVER = "dra.cpu"
POOL = "node-a"
PAGE_SIZES_KIB = (2048, 1048576)
RESERVATIONS = ("5%", "0", "8Mi", "0:4Mi,50%")
bindings = st.sampled_from((None, *MemoryBinding))


@st.composite
def topologies(draw: st.DrawFn) -> Topology:
    nodes = draw(st.integers(1, 3))
    cores_per_node = draw(st.integers(1, 4))
    threads = draw(st.sampled_from((1, 2)))
    l3_per_node = draw(st.integers(1, 2))
    total_cores = nodes * cores_per_node
    # CPU 0 stays online, as on x86.
    offline = (
        draw(st.sets(st.integers(1, total_cores * threads - 1), max_size=2)) if total_cores * threads > 1 else set()
    )
    cpus = []
    for core in range(total_cores):
        node = core // cores_per_node
        siblings = CPUSet.of(t * total_cores + core for t in range(threads) if t * total_cores + core not in offline)
        for t in range(threads):
            cpu_id = t * total_cores + core
            online = cpu_id not in offline
            cpus.append(
                Cpu(
                    id=cpu_id,
                    online=online,
                    socket=0 if online else None,
                    core=core if online else None,
                    numa_node=node,
                    thread_siblings=siblings if online else CPUSet(),
                    l2_cache=core if online else None,
                    l3_cache=node * l3_per_node + (core % cores_per_node) * l3_per_node // cores_per_node
                    if online
                    else None,
                )
            )
    cpus.sort(key=lambda c: c.id)
    numa_nodes = []
    for node in range(nodes):
        pools = tuple(
            HugePagePool(size, total, total)
            for size, total in zip(PAGE_SIZES_KIB, (draw(st.integers(0, 8)), draw(st.integers(0, 2))), strict=True)
        )
        pages = sum(pool.total * pool.size_bytes for pool in pools)
        numa_nodes.append(
            NumaNode(
                id=node,
                cpus=CPUSet.of(c.id for c in cpus if c.numa_node == node and c.online),
                distances=tuple((other, 10 if other == node else 20) for other in range(nodes)),
                memory_bytes=pages + draw(st.integers(0, 48)) * MEMORY_STEP + draw(st.integers(0, 4095)) * 1024,
                hugepages=pools,
            )
        )
    return Topology(cpus=tuple(cpus), numa_nodes=tuple(numa_nodes), smt_active=threads > 1)


@st.composite
def device_configs(draw: st.DrawFn, topology: Topology) -> DeviceConfig:
    online = topology.online_cpus.sorted()
    reserved = draw(st.sets(st.sampled_from(online), max_size=min(2, len(online) - 1)))
    return DeviceConfig(
        node_name=POOL,
        driver_name=DRIVER,
        reserved_cpus=CPUSet.of(reserved),
        device_mode=draw(st.sampled_from(list(DeviceMode))),
        whole_cores=draw(st.booleans()),
        group_by=draw(st.sampled_from(list(GroupBy))),
        min_shared_cpus=draw(st.integers(1, 3)),
        strict_reserved=draw(st.booleans()),
        reserved_memory=parse_reserved_memory(draw(st.sampled_from(RESERVATIONS))),
    )


policies = st.builds(AllocationPolicy, whole_cores=st.booleans(), align_l3=st.booleans(), spread=st.booleans())


@st.composite
def device_results(draw: st.DrawFn, devices: tuple[Device, ...], index: int) -> DeviceResult:
    device = draw(st.sampled_from(devices))
    consumed: tuple[tuple[str, str], ...] = ()
    if device.type is not DeviceType.CPU:
        # Pages or MiB; none recorded: the requestPolicy default, one step.
        steps = draw(st.integers(0, max(1, device.capacity // device.step) + 2))
        consumed = ((f"{DRIVER}/memory", str(steps * device.step)),) if steps else ()
    elif device.capacity:
        count = draw(st.integers(1, device.capacity + 1))
        consumed = ((f"{DRIVER}/cpu", str(count)),)
    return DeviceResult(
        request=f"r{index}",
        device=device.name,
        pool=POOL,
        share_id=f"s{index}" if device.capacity else None,
        consumed=consumed,
        policy=draw(policies),
        memory_binding=draw(bindings),
    )


@st.composite
def claim_requests(draw: st.DrawFn, devices: tuple[Device, ...], uid: str) -> ClaimRequest:
    results = [draw(device_results(devices, i)) for i in range(draw(st.integers(1, 3)))]
    return ClaimRequest(ClaimRef("default", f"claim-{uid}", uid), tuple(results), (PodRef(f"pod-{uid}", f"pod-{uid}"),))


@dataclass(frozen=True)
class Scenario:
    """A machine, its devices, a set of claims and the order the kubelet prepares and unprepares them in."""

    topology: Topology
    config: DeviceConfig
    devices: tuple[Device, ...]
    claims: tuple[ClaimRequest, ...]
    # ("prepare" | "unprepare", index into claims)
    ops: tuple[tuple[str, int], ...]


@st.composite
def scenarios(draw: st.DrawFn, max_claims: int = 8, max_ops: int = 24) -> Scenario:
    topology = draw(topologies())
    config = draw(device_configs(topology))
    if settings_problems(topology, config):
        reject()  # no CPU left to claims (reserved, cut by offline or reserved CPUs, or kept shared)
    devices = build_devices(topology, config)
    claims = tuple(draw(claim_requests(devices, f"u{i}")) for i in range(draw(st.integers(1, max_claims))))
    ops = draw(
        st.lists(
            st.tuples(st.sampled_from(("prepare", "prepare", "unprepare")), st.integers(0, len(claims) - 1)),
            min_size=1,
            max_size=max_ops,
        )
    )
    return Scenario(topology, config, devices, claims, tuple(ops))


@st.composite
def loose_claims(draw: st.DrawFn, topology: Topology, max_claims: int = 6) -> list[PreparedClaim]:
    """Claims as a damaged disk may hold them: any CPUs (some not on this machine), any hugepage and memory
    grants."""
    ids = st.integers(0, len(topology.cpus) + 3)
    claims = []
    for i in range(draw(st.integers(0, max_claims))):
        devices = [
            PreparedDevice(("cpus",), POOL, "cpu-numa0", None, CPUSet.of(draw(st.sets(ids, min_size=1, max_size=4))))
        ]
        if draw(st.booleans()):
            size = draw(st.sampled_from(PAGE_SIZES_KIB))
            grant = HugePageGrant(draw(st.integers(0, 3)), size, draw(st.integers(1, 6)) * size * 1024)
            devices.append(PreparedDevice(("pages",), POOL, "hugepages", None, hugepages=grant))
        for node in draw(st.lists(st.integers(0, 3), max_size=2)):
            memory = MemoryGrant(node, draw(st.integers(1, 40)) * MEMORY_STEP)
            devices.append(PreparedDevice(("mem",), POOL, f"memory-numa{node}", None, memory=memory))
        uid = f"d{i}"
        claims.append(PreparedClaim(ClaimRef("default", uid, uid), tuple(devices)).with_binding(draw(bindings)))
    return claims


@st.composite
def memory_capacities(draw: st.DrawFn, topology: Topology) -> dict[int, int]:
    """What each NUMA node's memory device publishes under some reservation (a node of none is absent)."""
    reserved = draw(st.sampled_from([ReservedMemory(), *map(parse_reserved_memory, RESERVATIONS)]))
    capacity = {node.id: allocatable_memory(node, reserved) for node in topology.numa_nodes}
    return {node: size for node, size in capacity.items() if size}
