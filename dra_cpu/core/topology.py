"""What a node has: CPUs, caches, NUMA nodes, hugepages and PCIe root complexes. Pure values, no I/O (sysfs.py
builds them)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dra_cpu.core.cpuset import CPUSet


def page_size_quantity(size_kib: int) -> str:
    """A hugepage size as a Kubernetes quantity: 2048 -> "2Mi", 1048576 -> "1Gi"."""
    if size_kib % (1024 * 1024) == 0:
        return f"{size_kib // (1024 * 1024)}Gi"
    if size_kib % 1024 == 0:
        return f"{size_kib // 1024}Mi"
    return f"{size_kib}Ki"


@dataclass(frozen=True, slots=True)
class HugePagePool:
    size_kib: int
    total: int
    # Pages in use come and go with the workloads: not a change of the topology (nothing to republish).
    free: int = field(compare=False)

    @property
    def quantity(self) -> str:
        return page_size_quantity(self.size_kib)

    @property
    def size_bytes(self) -> int:
        return self.size_kib * 1024


@dataclass(frozen=True, slots=True)
class Cpu:
    """One logical CPU. Offline CPUs carry None where the kernel removed their topology files."""

    id: int
    online: bool
    socket: int | None = None
    die: int | None = None
    cluster: int | None = None
    core: int | None = None
    numa_node: int | None = None
    thread_siblings: CPUSet = field(default_factory=CPUSet)
    l2_cache: int | None = None
    l3_cache: int | None = None
    isolated: bool = False
    nohz_full: bool = False
    # "performance" or "efficiency" on hybrid parts, None elsewhere.
    core_type: str | None = None

    @property
    def core_key(self) -> tuple[int | None, int | None, int | None]:
        """Identifies the physical core: core ids repeat across sockets and dies."""
        return (self.socket, self.die, self.core)


@dataclass(frozen=True, slots=True)
class NumaNode:
    id: int
    cpus: CPUSet
    distances: tuple[tuple[int, int], ...]
    memory_bytes: int
    hugepages: tuple[HugePagePool, ...] = ()

    @property
    def memory_only(self) -> bool:
        return not self.cpus

    def distance_to(self, node: int) -> int | None:
        return dict(self.distances).get(node)


@dataclass(frozen=True, slots=True)
class PcieRoot:
    """A PCIe root complex: `name` as the kernel's top folder under /sys/devices (`pci0000:00`, the value of the
    standard attribute resource.kubernetes.io/pcieRoot that GPU and NIC drivers publish), and its NUMA node; None
    where the firmware gives none (numa_node -1): the kernel then counts every CPU as local to it."""

    name: str
    numa_node: int | None


@dataclass(frozen=True)
class Topology:
    cpus: tuple[Cpu, ...]
    numa_nodes: tuple[NumaNode, ...]
    hugepages: tuple[HugePagePool, ...] = ()
    smt_active: bool = False
    cpu_model: str = ""
    # L3 cache id -> size in bytes.
    l3_cache_bytes: tuple[tuple[int, int], ...] = ()
    # Read only when asked (read_topology(pcie_roots=True)); () otherwise.
    pcie_roots: tuple[PcieRoot, ...] = ()
    _by_id: Mapping[int, Cpu] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {cpu.id: cpu for cpu in self.cpus})

    def cpu(self, cpu_id: int) -> Cpu:
        return self._by_id[cpu_id]

    def node(self, node_id: int) -> NumaNode:
        for node in self.numa_nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    @property
    def present_cpus(self) -> CPUSet:
        return CPUSet(frozenset(self._by_id))

    # Made once: every prepare asks for these (the capacity of the pool a claim draws from).
    @cached_property
    def online_cpus(self) -> CPUSet:
        return CPUSet.of(c.id for c in self.cpus if c.online)

    @cached_property
    def offline_cpus(self) -> CPUSet:
        return CPUSet.of(c.id for c in self.cpus if not c.online)

    @cached_property
    def isolated_cpus(self) -> CPUSet:
        return CPUSet.of(c.id for c in self.cpus if c.isolated)

    @property
    def l3_total_bytes(self) -> int:
        """Every L3 cache of the machine together (0 without an L3)."""
        return sum(size for _, size in self.l3_cache_bytes)

    @property
    def sockets(self) -> list[int]:
        return sorted({c.socket for c in self.cpus if c.socket is not None})

    @property
    def threads_per_core(self) -> int:
        """The widest SMT group among online CPUs (1 without SMT; 2, 4 or 8 with it)."""
        return max((len(c.thread_siblings) for c in self.cpus if c.online), default=1)

    def cores(self, cpus: CPUSet | None = None) -> list[CPUSet]:
        """Physical cores as sets of their online threads, restricted to `cpus`, ordered by first CPU."""
        return _group(self._online_in(cpus), lambda c: c.core_key)

    def l3_groups(self, cpus: CPUSet | None = None) -> dict[int, CPUSet]:
        """Online CPUs by L3 cache id; CPUs without an L3 form one group each under their own negative key."""
        groups: dict[int, set[int]] = {}
        for cpu in self._online_in(cpus):
            key = cpu.l3_cache if cpu.l3_cache is not None else -1 - cpu.id
            groups.setdefault(key, set()).add(cpu.id)
        return {k: CPUSet.of(v) for k, v in sorted(groups.items())}

    def numa_nodes_of(self, cpus: CPUSet) -> CPUSet:
        return CPUSet.of(self.cpu(i).numa_node for i in cpus if self.cpu(i).numa_node is not None)  # type: ignore[misc]

    def pcie_roots_local_to(self, nodes: CPUSet) -> tuple[str, ...]:
        """The names of the PCIe roots local to any of `nodes`, sorted: each root on one of them, and each root
        without a NUMA node (local to every CPU, as the kernel's pci_bus cpulistaffinity says)."""
        return tuple(sorted(r.name for r in self.pcie_roots if r.numa_node is None or r.numa_node in nodes))

    def _online_in(self, cpus: CPUSet | None) -> list[Cpu]:
        ids = cpus if cpus is not None else self.present_cpus
        return [self._by_id[i] for i in ids if i in self._by_id and self._by_id[i].online]

    def as_dict(self) -> dict[str, Any]:
        """The shape of `dra-cpu discover --output json` (the documented contract)."""
        return {
            "cpuModel": self.cpu_model,
            "smtActive": self.smt_active,
            "threadsPerCore": self.threads_per_core,
            "cpus": [_cpu_dict(c) for c in self.cpus],
            "numaNodes": [_node_dict(n) for n in self.numa_nodes],
            "hugepages": _hugepages_dict(self.hugepages),
            "pcieRoots": [{"name": r.name, "numaNode": r.numa_node} for r in self.pcie_roots],
            "summary": {
                "online": str(self.online_cpus),
                "offline": str(self.offline_cpus),
                "isolated": str(self.isolated_cpus),
                "sockets": self.sockets,
                "physicalCores": len(self.cores()),
                "l3Groups": {str(k): str(v) for k, v in self.l3_groups().items()},
            },
        }


def _group(cpus: Iterable[Cpu], key: Any) -> list[CPUSet]:
    groups: dict[Any, set[int]] = {}
    for cpu in cpus:
        groups.setdefault(key(cpu), set()).add(cpu.id)
    return sorted((CPUSet.of(g) for g in groups.values()), key=lambda s: s.first())


def _hugepages_dict(pools: Iterable[HugePagePool]) -> dict[str, dict[str, int]]:
    return {p.quantity: {"total": p.total, "free": p.free} for p in sorted(pools, key=lambda p: p.size_kib)}


def _cpu_dict(cpu: Cpu) -> dict[str, Any]:
    return {
        "id": cpu.id,
        "online": cpu.online,
        "socket": cpu.socket,
        "die": cpu.die,
        "cluster": cpu.cluster,
        "core": cpu.core,
        "numaNode": cpu.numa_node,
        "l2Cache": cpu.l2_cache,
        "l3Cache": cpu.l3_cache,
        "threadSiblings": cpu.thread_siblings.sorted(),
        "isolated": cpu.isolated,
        "nohzFull": cpu.nohz_full,
        "coreType": cpu.core_type,
    }


def _node_dict(node: NumaNode) -> dict[str, Any]:
    return {
        "id": node.id,
        "cpus": node.cpus.sorted(),
        "distances": {str(k): v for k, v in node.distances},
        "memoryBytes": node.memory_bytes,
        "memoryOnly": node.memory_only,
        "hugepages": _hugepages_dict(node.hugepages),
    }
