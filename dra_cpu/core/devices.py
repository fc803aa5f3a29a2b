"""Topology + DeviceConfig -> the devices the scheduler sees, and the ResourceSlices that carry them. Pure.

Grouped mode (the default) publishes one consumable-capacity device (KEP-5075) per NUMA node, or per socket, or one
for the whole machine (`groupBy`): the scheduler counts CPUs, the driver picks the exact ones at prepare time.
Isolated CPUs get devices of their own so that only a claim that asks for them on purpose lands there. Hugepages
reserved on a node get one device per page size and NUMA node in every mode, and so does memory: one device per
NUMA node with its allocatable memory (core/memory.py) as capacity. Both carry the standard NUMA attribute, so that
a claim's `matchAttribute: resource.kubernetes.io/numaNode` puts its CPUs, memory and pages on one node.
With `node_allocatable` every device
also says which node-allocatable resource its allocations stand for (KEP-5517, `nodeAllocatableResources`). With
`pcie_roots` every CPU device lists the PCIe root complexes local to its CPUs in the standard list attribute
resource.kubernetes.io/pcieRoot (KEP-5491 list attributes), so that a claim can match it against the scalar pcieRoot
of another driver's GPU or NIC.

Each fact is published once, where a selector can need it: a slice is read by the scheduler for every pod it places
and kept by the API server and etcd for every node, so a byte per device is paid many times over at cluster scale
(docs/scale.md). The two copies of the NUMA node id that claims written for other drivers select on (see
DeviceConfig) are the exceptions, on by default. Facts the same for every device of a node are not repeated on each
device unless a selector needs them there: `type` (the DeviceClasses tell CPUs from hugepages by it) and
`smtEnabled` (an attribute of the upstream driver's that its claims may select); `isolated` is published on isolated
CPU devices only, `numaNodes` and `numaNodeCount` only where one device may span several NUMA nodes (groupBy socket
and machine).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dra_cpu.core.capacity import SharedFloor, split_cpus
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.memory import MEMORY_STEP, ReservedMemory, allocatable_memory
from dra_cpu.core.quantity import format_bytes
from dra_cpu.core.topology import NumaNode, Topology, page_size_quantity
from dra_cpu.errors import DraCpuError

API_VERSION = "resource.k8s.io/v1"
# KEP-5075's capacity keys and the standard NUMA attribute the kubelet topology-hint provider reads.
STANDARD_NUMA_ATTRIBUTE = "resource.kubernetes.io/numaNode"
# Claims written for the DRA network drivers select on this one; the upstream CPU driver's is <driver>/numaNodeID.
NET_NUMA_ATTRIBUTE = "dra.net/numaNode"
# The standard name GPU and NIC drivers publish their root complex under (k8s.io/dynamic-resource-allocation
# deviceattribute): a string there, a list of strings on our CPU devices (gate DRAListTypeAttributes).
PCIE_ROOT_ATTRIBUTE = "resource.kubernetes.io/pcieRoot"
MAX_DEVICES_PER_SLICE = 128
# A slice with a list attribute (or taints, or counters) holds at most 64 devices.
MAX_DEVICES_PER_SLICE_WITH_LISTS = 64
# Per device: every scalar attribute counts 1, every element of a list attribute 1.
MAX_ATTRIBUTE_VALUES_PER_DEVICE = 48
MAX_STRING_ATTRIBUTE = 64

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# A tuple is a list attribute (`strings`): KEP-5491, 1.36+ with the DRAListTypeAttributes gate.
AttributeValue = bool | int | str | tuple[str, ...]


class DeviceMode(StrEnum):
    GROUPED = "grouped"
    INDIVIDUAL = "individual"


class GroupBy(StrEnum):
    """What one grouped-mode CPU device covers (the upstream driver's `groupBy` values)."""

    NUMA_NODE = "numanode"
    SOCKET = "socket"
    MACHINE = "machine"


class DeviceType(StrEnum):
    CPU = "cpu"
    HUGEPAGES = "hugepages"
    MEMORY = "memory"


class DeviceConfigError(DraCpuError):
    """A driver setting that cannot produce valid devices."""


@dataclass(frozen=True)
class DeviceConfig:
    node_name: str
    driver_name: str = "dra.cpu"
    reserved_cpus: CPUSet = field(default_factory=CPUSet)
    device_mode: DeviceMode = DeviceMode.GROUPED
    whole_cores: bool = False
    group_by: GroupBy = GroupBy.NUMA_NODE
    # KEP-5517: publish `nodeAllocatableResources` (cpu, hugepages-<size>) so that the scheduler and the kubelet
    # count what claims get against node allocatable. Needs the DRANodeAllocatableResources gate (1.36+).
    node_allocatable: bool = False
    # KEP-5491: list the PCIe roots local to each CPU device in resource.kubernetes.io/pcieRoot. Needs the
    # DRAListTypeAttributes gate (1.36+) and a Topology read with its PCIe roots.
    pcie_roots: bool = False
    # Copies of the standard NUMA attribute under the names claims written for other drivers select on:
    # <driver>/numaNodeID (the upstream CPU driver's) and dra.net/numaNode (the DRA network drivers'). Off, they save
    # their bytes on every device of every node, and such claims no longer match.
    upstream_numa_attribute: bool = True
    dranet_numa_attribute: bool = True
    # The shared-CPU floor (minSharedCpus) is held back from the devices, so that what they offer prepare grants
    # (core/capacity.py); strictReserved keeps containers without claims off the reserved CPUs, so those do not
    # count towards it.
    min_shared_cpus: int = 1
    strict_reserved: bool = False
    # What each NUMA node keeps for the system: its memory device publishes the rest (core/memory.py). Off, no memory
    # devices at all: slices of CPUs (and pages) only, for clusters that claim no memory and would rather not pay a
    # device per NUMA node in every slice the scheduler reads (docs/scale.md).
    reserved_memory: ReservedMemory = field(default_factory=ReservedMemory)
    memory_devices: bool = True

    def __post_init__(self) -> None:
        _check_dns_subdomain("driver name", self.driver_name, 63)
        _check_dns_subdomain("node name", self.node_name, 253)
        if self.min_shared_cpus < 0:
            raise DeviceConfigError(f"minSharedCpus {self.min_shared_cpus}: must not be negative")

    @property
    def shared_floor(self) -> SharedFloor:
        return SharedFloor(self.min_shared_cpus, self.reserved_cpus if self.strict_reserved else CPUSet())

    @property
    def cpu_capacity(self) -> str:
        return f"{self.driver_name}/cpu"

    @property
    def memory_capacity(self) -> str:
        return f"{self.driver_name}/memory"


@dataclass(frozen=True)
class Device:
    """One published device and what it stands for on this node."""

    name: str
    type: DeviceType
    # The NUMA nodes the device covers: one, except for socket and machine devices on multi-NUMA sockets/machines.
    numa_nodes: CPUSet
    # CPU devices: the CPUs a claim on this device may get. Hugepage devices: empty.
    cpus: CPUSet
    isolated: bool
    attributes: tuple[tuple[str, AttributeValue], ...]
    # CPU count or hugepage or memory bytes; 0 for individual-mode devices, which have no capacity.
    capacity: int = 0
    # Smallest amount a claim may consume, and the step above it (threads per core with whole cores, a page size,
    # MEMORY_STEP).
    step: int = 1
    page_size_kib: int | None = None
    capacity_key: str | None = None
    # KEP-5517: the node-allocatable resource (`cpu`, `hugepages-2Mi`) that an allocation of this device stands for;
    # None: not published.
    node_allocatable: str | None = None

    @property
    def numa_node(self) -> int:
        """The device's one NUMA node; ValueError for a device that spans several (socket and machine groups)."""
        if len(self.numa_nodes) != 1:
            raise ValueError(f"device {self.name} spans NUMA nodes {self.numa_nodes or 'none'}")
        return self.numa_nodes.first()

    def to_api(self) -> dict[str, Any]:
        device: dict[str, Any] = {
            "name": self.name,
            "attributes": {key: _attribute(value) for key, value in self.attributes},
        }
        key = self.capacity_key
        if key is not None and self.capacity:
            # No `max`: the capacity's value bounds every request already.
            valid_range = {"min": quantity(self.step, self.type)}
            # The API server refuses a step that does not fit above the minimum (min + step > value), which a device
            # of one step is (a lone isolated CPU, one core with whole cores, a pool of one page): its one valid
            # amount is min = the value, and the whole slice would be refused with it.
            if 2 * self.step <= self.capacity:
                valid_range["step"] = quantity(self.step, self.type)
            device["capacity"] = {
                key: {
                    "value": quantity(self.capacity, self.type),
                    "requestPolicy": {"default": quantity(self.step, self.type), "validRange": valid_range},
                }
            }
            device["allowMultipleAllocations"] = True
        if self.node_allocatable is not None:
            # Capacity devices map what the scheduler records as consumed (1 dra.cpu/cpu = 1 cpu, 1 byte of
            # dra.cpu/memory = 1 byte of hugepages-<size> or of memory); a device without capacity (one CPU) is one
            # unit.
            mapping = (
                {"capacityKey": key, "capacityMultiplier": "1"}
                if key is not None and self.capacity
                else {"deviceMultiplier": "1"}
            )
            device["nodeAllocatableResources"] = {self.node_allocatable: {"mapping": mapping}}
        return device


def quantity(value: int, kind: DeviceType) -> str:
    return str(value) if kind is DeviceType.CPU else format_bytes(value)


def _attribute(value: AttributeValue) -> dict[str, Any]:
    if isinstance(value, tuple):
        return {"strings": [item[:MAX_STRING_ATTRIBUTE] for item in value]}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    return {"string": value[:MAX_STRING_ATTRIBUTE]}


def allocatable_cpus(topology: Topology, config: DeviceConfig) -> CPUSet:
    """Online CPUs that claims may get: what the devices publish (core/capacity.py says which and why)."""
    return split_cpus(topology, config).claimable


def build_devices(topology: Topology, config: DeviceConfig) -> tuple[Device, ...]:
    """The node's devices; none for CPUs when the settings leave none to claims (check_settings says why)."""
    available = allocatable_cpus(topology, config)
    if config.device_mode is DeviceMode.INDIVIDUAL:
        cpu_devices = _individual_devices(topology, config, available)
    else:
        cpu_devices = _grouped_devices(topology, config, available)
    devices = (*cpu_devices, *_hugepage_devices(topology, config), *_memory_devices(topology, config))
    for device in devices:
        lists = [len(v) for _, v in device.attributes if isinstance(v, tuple)]
        values = len(device.attributes) - len(lists) + sum(lists)
        if values > MAX_ATTRIBUTE_VALUES_PER_DEVICE:
            raise DeviceConfigError(
                f"device {device.name} would carry {values} attribute values, above the "
                f"{MAX_ATTRIBUTE_VALUES_PER_DEVICE} Kubernetes allows: too many PCIe roots ({sum(lists)}) for one "
                "device; use smaller groups (groupBy numanode) or turn publishPcieRoots off"
            )
    return devices


def _pcie_root_attributes(topology: Topology, config: DeviceConfig, nodes: CPUSet) -> list[tuple[str, AttributeValue]]:
    """The roots local to a CPU device's NUMA nodes; none (no attribute: a list must not be empty) when none is."""
    if not config.pcie_roots:
        return []
    roots = topology.pcie_roots_local_to(nodes)
    return [(PCIE_ROOT_ATTRIBUTE, roots)] if roots else []


def _numa_attributes(config: DeviceConfig, node: int) -> list[tuple[str, AttributeValue]]:
    attributes: list[tuple[str, AttributeValue]] = [(STANDARD_NUMA_ATTRIBUTE, node)]
    if config.upstream_numa_attribute:
        attributes.append((f"{config.driver_name}/numaNodeID", node))
    if config.dranet_numa_attribute:
        attributes.append((NET_NUMA_ATTRIBUTE, node))
    return attributes


def _isolated_attributes(config: DeviceConfig, isolated: bool) -> list[tuple[str, AttributeValue]]:
    """`isolated: true` on devices of isolated CPUs only: the DeviceClasses read a missing one as false."""
    return [(f"{config.driver_name}/isolated", True)] if isolated else []


def _groups(topology: Topology, config: DeviceConfig, available: CPUSet) -> list[tuple[str, CPUSet, CPUSet | None]]:
    """(name suffix, CPUs, NUMA node or None: the nodes of the CPUs) of each grouped-mode device before the
    isolated CPUs are split off."""
    if config.group_by is GroupBy.MACHINE:
        return [("machine", available, None)]
    if config.group_by is GroupBy.SOCKET:
        sockets: dict[int, set[int]] = {}
        for cpu_id in available:
            socket = topology.cpu(cpu_id).socket
            sockets.setdefault(socket if socket is not None else 0, set()).add(cpu_id)
        return [(f"socket{socket}", CPUSet.of(cpus), None) for socket, cpus in sorted(sockets.items())]
    return [(f"numa{node.id}", node.cpus & available, CPUSet.of([node.id])) for node in topology.numa_nodes]


def _grouped_devices(topology: Topology, config: DeviceConfig, available: CPUSet) -> list[Device]:
    d = config.driver_name
    devices = []
    for suffix, cpus, numa in _groups(topology, config, available):
        for isolated in (False, True):
            pool = cpus & topology.isolated_cpus if isolated else cpus - topology.isolated_cpus
            if not pool:
                continue
            # With whole cores a claim takes cores of the pool's widest kind: a core whose sibling is offline is a
            # whole core of one thread, and a pool of only such cores steps by one.
            step = max(len(core) for core in topology.cores(pool)) if config.whole_cores else 1
            nodes = numa if numa is not None else topology.numa_nodes_of(pool)
            sockets = sorted({s for i in pool if (s := topology.cpu(i).socket) is not None})
            attributes: list[tuple[str, AttributeValue]] = [(f"{d}/type", DeviceType.CPU.value)]
            # The NUMA attributes hold one node: a device over several NUMA nodes (a socket with sub-NUMA
            # clustering, a machine) has none, as upstream's socket and machine devices.
            if len(nodes) == 1:
                attributes += _numa_attributes(config, nodes.first())
            # Which NUMA nodes, and how many: only where a device may cover several. A NUMA node's device would
            # repeat its numaNode, and a count of 1 on every device of the node.
            if config.group_by is not GroupBy.NUMA_NODE:
                attributes += [(f"{d}/numaNodes", str(nodes)), (f"{d}/numaNodeCount", len(nodes))]
            if len(sockets) <= 1:
                attributes.append((f"{d}/socketID", sockets[0] if sockets else 0))
            attributes += [
                (f"{d}/numCPUs", len(pool)),
                (f"{d}/smtEnabled", topology.smt_active),
                *_isolated_attributes(config, isolated),
                *_pcie_root_attributes(topology, config, nodes),
            ]
            devices.append(
                Device(
                    name=f"cpu-isolated-{suffix}" if isolated else f"cpu-{suffix}",
                    type=DeviceType.CPU,
                    numa_nodes=nodes,
                    cpus=pool,
                    isolated=isolated,
                    attributes=tuple(attributes),
                    capacity=len(pool),
                    step=step,
                    capacity_key=config.cpu_capacity,
                    node_allocatable="cpu" if config.node_allocatable else None,
                )
            )
    return devices


def _individual_devices(topology: Topology, config: DeviceConfig, available: CPUSet) -> list[Device]:
    d = config.driver_name
    devices = []
    # The scheduler gives a request for N devices (a count, or an extended resource) the first N free ones in slice
    # order: NUMA node by NUMA node, the threads of a core together, and a node's cores of which some thread is held
    # back (reserved, or kept for the shared pool) after its whole ones, it takes whole cores of one node first.
    for cpu_id in sorted(available, key=lambda i: _numa_core_order(topology, available, i)):
        cpu = topology.cpu(cpu_id)
        node = cpu.numa_node if cpu.numa_node is not None else 0
        l3 = cpu.l3_cache if cpu.l3_cache is not None else -1
        attributes: list[tuple[str, AttributeValue]] = [
            (f"{d}/type", DeviceType.CPU.value),
            *_numa_attributes(config, node),
            (f"{d}/cpuID", cpu.id),
            (f"{d}/coreID", cpu.core if cpu.core is not None else cpu.id),
            (f"{d}/socketID", cpu.socket if cpu.socket is not None else 0),
            # The upstream driver's name for the L3 cache id, so that its claims match.
            (f"{d}/cacheL3ID", l3),
            (f"{d}/smtEnabled", topology.smt_active),
            *_isolated_attributes(config, cpu.isolated),
            *_pcie_root_attributes(topology, config, CPUSet.of([node])),
        ]
        devices.append(
            Device(
                name=f"cpu-{cpu.id}",
                type=DeviceType.CPU,
                numa_nodes=CPUSet.of([node]),
                cpus=CPUSet.of([cpu.id]),
                isolated=cpu.isolated,
                attributes=tuple(attributes),
                node_allocatable="cpu" if config.node_allocatable else None,
            )
        )
    return devices


def _numa_core_order(topology: Topology, available: CPUSet, cpu_id: int) -> tuple[int, bool, int, int]:
    cpu = topology.cpu(cpu_id)
    partial = not (cpu.thread_siblings & topology.online_cpus).issubset(available)
    return (cpu.numa_node if cpu.numa_node is not None else 0, partial, cpu.thread_siblings.first(), cpu_id)


def _hugepage_devices(topology: Topology, config: DeviceConfig) -> list[Device]:
    devices = []
    for node in topology.numa_nodes:
        for pool in node.hugepages:
            if pool.total <= 0:
                continue
            size = page_size_quantity(pool.size_kib)
            devices.append(
                _memory_device(
                    config,
                    node,
                    f"hugepages-{size.lower()}-numa{node.id}",
                    DeviceType.HUGEPAGES,
                    pool.total * pool.size_bytes,
                    pool.size_bytes,
                    [(f"{config.driver_name}/pageSize", size)],
                    f"hugepages-{size}",
                    page_size_kib=pool.size_kib,
                )
            )
    return devices


def _memory_devices(topology: Topology, config: DeviceConfig) -> list[Device]:
    """One per NUMA node with memory for claims; none for a node whose reservation and pages take it all."""
    devices: list[Device] = []
    for node in topology.numa_nodes if config.memory_devices else ():
        capacity = allocatable_memory(node, config.reserved_memory)
        if capacity:
            devices.append(
                _memory_device(config, node, f"memory-numa{node.id}", DeviceType.MEMORY, capacity, MEMORY_STEP)
            )
    return devices


def _memory_device(
    config: DeviceConfig,
    node: NumaNode,
    name: str,
    kind: DeviceType,
    capacity: int,
    step: int,
    extra: list[tuple[str, AttributeValue]] | None = None,
    allocatable: str = "memory",
    page_size_kib: int | None = None,
) -> Device:
    """A device of bytes on one NUMA node: its hugepages of one size, or its memory."""
    d = config.driver_name
    attributes: list[tuple[str, AttributeValue]] = [
        (f"{d}/type", kind.value),
        *(extra or []),
        *_numa_attributes(config, node.id),
    ]
    if node.memory_only:
        attributes.append((f"{d}/memoryOnly", True))
    return Device(
        name=name,
        type=kind,
        numa_nodes=CPUSet.of([node.id]),
        cpus=CPUSet(),
        isolated=False,
        attributes=tuple(attributes),
        capacity=capacity,
        step=step,
        page_size_kib=page_size_kib,
        capacity_key=config.memory_capacity,
        node_allocatable=allocatable if config.node_allocatable else None,
    )


def memory_capacity(devices: Iterable[Device]) -> dict[int, int]:
    """NUMA node -> the memory claims may get there: what the node's memory device publishes."""
    return {device.numa_node: device.capacity for device in devices if device.type is DeviceType.MEMORY}


def device_index(devices: Iterable[Device]) -> Mapping[str, Device]:
    return {device.name: device for device in devices}


def slice_name(config: DeviceConfig, index: int) -> str:
    """Deterministic names: a restarted driver finds and updates its own slices instead of adding new ones."""
    name = f"{config.node_name}-{config.driver_name}-{index}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(f"{config.node_name}/{config.driver_name}".encode()).hexdigest()[:10]
    return f"{config.node_name[:200]}-{digest}-{index}"


def build_slices(devices: tuple[Device, ...], config: DeviceConfig, generation: int = 1) -> list[dict[str, Any]]:
    """The node's pool as ResourceSlice objects, at most 128 devices each (none of ours use taints or counters), or 64
    where a device has a list attribute (pcieRoot)."""
    lists = any(isinstance(value, tuple) for device in devices for _, value in device.attributes)
    size = MAX_DEVICES_PER_SLICE_WITH_LISTS if lists else MAX_DEVICES_PER_SLICE
    chunks = [devices[i : i + size] for i in range(0, len(devices), size)] or [()]
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "ResourceSlice",
            "metadata": {"name": slice_name(config, index)},
            "spec": {
                "driver": config.driver_name,
                "nodeName": config.node_name,
                "pool": {"name": config.node_name, "generation": generation, "resourceSliceCount": len(chunks)},
                "devices": [device.to_api() for device in chunk],
            },
        }
        for index, chunk in enumerate(chunks)
    ]


def _check_dns_subdomain(what: str, value: str, limit: int) -> None:
    labels = value.split(".")
    if not value or len(value) > limit or not all(_DNS_LABEL.match(label) for label in labels):
        raise DeviceConfigError(
            f"invalid {what} {value!r}: must be a lowercase DNS subdomain of at most {limit} characters"
        )
