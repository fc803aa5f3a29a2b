"""read_topology(root) -> Topology: the only module that reads /sys (and /proc/cpuinfo) for topology.

With `pcie_roots=True` it also reads the PCIe root complexes: each top folder sys/devices/pciDDDD:BB (the name the
standard attribute resource.kubernetes.io/pcieRoot carries, as k8s.io/dynamic-resource-allocation/deviceattribute
derives it for GPUs and NICs) and its NUMA node: the `numa_node` of the PCI devices on the root bus (the kernel gives
each the root bus's node; -1: the firmware named none). The bus's own pci_bus/DDDD:BB/cpulistaffinity says the same
as a CPU list (the node's CPUs, every online CPU for -1) but cannot name a node without CPUs, so it is not read.

Missing files are normal on real kernels (cpu0 without `online`, offline CPUs without `topology/`, nodes without
hugepages, machines without an L3): they become None or empty. A file that exists but holds something the kernel
would never write is an error naming the file and its content. A CPU taken offline while it is read answers ENODEV
from its attributes for a moment: the whole read is made again, a few times, before that is an error.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Cpu, HugePagePool, NumaNode, PcieRoot, Topology
from dra_cpu.errors import DraCpuError, not_utf8, shown

T = TypeVar("T")

# The kernel reports cluster_id 65535 (and -1 on some architectures) when it knows no cluster.
_NO_ID = {-1, 65535, 0xFFFFFFFF}
_HUGEPAGE_DIR = re.compile(r"^hugepages-(\d+)kB$")
_NODE_DIR = re.compile(r"^node(\d+)$")
_INDEX_DIR = re.compile(r"^index(\d+)$")
# The kernel names a root complex's folder pci%04x:%02x (domain, bus) and a PCI device %04x:%02x:%02x.%d; domains
# can be wider than 4 hex digits.
_PCI_ROOT_DIR = re.compile(r"^pci([0-9a-f]{4,8}):([0-9a-f]{2})$")
_PCI_DEVICE_DIR = re.compile(r"^([0-9a-f]{4,8}):([0-9a-f]{2}):[0-9a-f]{2}\.[0-7]$")
# sysfs attributes fit a page; /proc/cpuinfo of a 16384-CPU machine is some 25 MB.
MAX_FILE_BYTES = 64 << 20


class SysfsError(DraCpuError):
    """A sysfs file that exists but cannot be read or makes no sense."""


class DeviceGone(SysfsError):
    """A device went away while its attributes were read: a hotplug in progress, settled a moment later."""


# How often, and after what pauses (seconds, growing), a read torn by a hotplug is made again.
TORN_READ_TRIES = 5
TORN_READ_PAUSE_SECONDS = 0.05


@dataclass(frozen=True)
class _Reader:
    root: Path

    def path(self, rel: str) -> Path:
        return self.root / rel

    def text(self, rel: str) -> str | None:
        try:
            with self.path(rel).open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as err:
            error = DeviceGone if err.errno == errno.ENODEV else SysfsError
            raise error(f"cannot read {self.path(rel)}: {err.strerror}") from None
        if len(data) > MAX_FILE_BYTES:
            raise SysfsError(f"{self.path(rel)}: larger than {MAX_FILE_BYTES} bytes, which no kernel writes")
        try:
            return data.decode()
        except UnicodeDecodeError as err:
            raise SysfsError(f"{self.path(rel)} is not UTF-8 text: {not_utf8(err)}") from None

    def cpuset(self, rel: str) -> CPUSet | None:
        return self._parsed(rel, lambda text: CPUSet() if text == "(null)" else CPUSet.parse(text))

    def int(self, rel: str) -> int | None:
        return self._parsed(rel, _integer)

    def _parsed(self, rel: str, parse: Callable[[str], T]) -> T | None:
        """The file's content as `parse` reads it; None when there is no such file; SysfsError naming the file
        when `parse` raises ValueError."""
        content = self.text(rel)
        if content is None:
            return None
        try:
            return parse(content.strip())
        except ValueError as err:
            raise SysfsError(f"{self.path(rel)}: {err}") from None

    def listdir(self, rel: str) -> list[str]:
        try:
            return os.listdir(self.path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return []


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, found {shown(text)}") from None


def read_topology(root: str | Path = "/", *, pcie_roots: bool = False) -> Topology:
    reader = _Reader(Path(root))
    for attempt in range(1, TORN_READ_TRIES):
        try:
            return _read_topology(reader, pcie_roots)
        except DeviceGone:
            time.sleep(TORN_READ_PAUSE_SECONDS * attempt)
    return _read_topology(reader, pcie_roots)


def _read_topology(reader: _Reader, pcie_roots: bool) -> Topology:
    if not reader.path("sys/devices/system/cpu").is_dir():
        raise SysfsError(f"{reader.path('sys/devices/system/cpu')} does not exist: is --sysfs-root right?")
    nodes = _read_nodes(reader)
    cpu_to_node = _cpu_to_node(nodes)
    l3_sizes: dict[int, int] = {}
    cpus = _read_cpus(reader, cpu_to_node, l3_sizes)
    _check_every_online_cpu_in_one_node(cpus, nodes, cpu_to_node)
    smt = reader.int("sys/devices/system/cpu/smt/active")
    topology = Topology(
        cpus=cpus,
        numa_nodes=nodes,
        hugepages=_read_hugepages(reader, "sys/kernel/mm/hugepages", "nr_hugepages"),
        cpu_model=_cpu_model(reader),
        smt_active=bool(smt) if smt is not None else any(len(c.thread_siblings) > 1 for c in cpus),
        l3_cache_bytes=tuple(sorted(l3_sizes.items())),
        pcie_roots=_read_pcie_roots(reader, nodes) if pcie_roots else (),
    )
    return topology


def _cpu_to_node(nodes: tuple[NumaNode, ...]) -> dict[int, int]:
    """CPU -> its NUMA node; a CPU in two nodes' cpulists is refused (slices would publish it twice)."""
    owner: dict[int, int] = {}
    for node in nodes:
        for cpu in node.cpus:
            if cpu in owner:
                raise SysfsError(f"sysfs: CPU {cpu} is in the cpulist of node{owner[cpu]} and node{node.id}")
            owner[cpu] = node.id
    return owner


def _check_every_online_cpu_in_one_node(
    cpus: tuple[Cpu, ...], nodes: tuple[NumaNode, ...], cpu_to_node: dict[int, int]
) -> None:
    """An online CPU in no node's cpulist would silently vanish from every device (a nodeN/ folder missing)."""
    homeless = CPUSet.of(c.id for c in cpus if c.online and c.id not in cpu_to_node)
    if homeless:
        listed = ", ".join(f"node{n.id}" for n in nodes) or "none"
        raise SysfsError(
            f"sysfs: online CPU(s) {homeless} are in no NUMA node's cpulist (nodes: {listed}; "
            "is a sys/devices/system/node/nodeN/ folder missing?)"
        )


def _present_cpus(reader: _Reader) -> CPUSet:
    present = reader.cpuset("sys/devices/system/cpu/present")
    if present is not None:
        return present
    return CPUSet.of(
        int(name[3:])
        for name in reader.listdir("sys/devices/system/cpu")
        if name.startswith("cpu") and name[3:].isdigit()
    )


def _read_cpus(reader: _Reader, cpu_to_node: dict[int, int], l3_sizes: dict[int, int]) -> tuple[Cpu, ...]:
    """The CPUs; `l3_sizes` collects each L3 cache's size, read once per cache."""
    base = "sys/devices/system/cpu"
    online = reader.cpuset(f"{base}/online")
    isolated = reader.cpuset(f"{base}/isolated") or CPUSet()
    nohz_full = reader.cpuset(f"{base}/nohz_full") or CPUSet()
    core_types = _core_types(reader)
    cpus = []
    for cpu_id in _present_cpus(reader):
        d = f"{base}/cpu{cpu_id}"
        is_online = _is_online(reader, d, cpu_id, online)
        if not is_online:
            cpus.append(Cpu(id=cpu_id, online=False, numa_node=cpu_to_node.get(cpu_id), isolated=cpu_id in isolated))
            continue
        siblings = reader.cpuset(f"{d}/topology/thread_siblings_list") or reader.cpuset(f"{d}/topology/core_cpus_list")
        l2, l3 = _cache_ids(reader, d, l3_sizes)
        cpus.append(
            Cpu(
                id=cpu_id,
                online=True,
                socket=_known_id(reader.int(f"{d}/topology/physical_package_id")),
                die=_known_id(reader.int(f"{d}/topology/die_id")),
                cluster=_known_id(reader.int(f"{d}/topology/cluster_id")),
                core=_known_id(reader.int(f"{d}/topology/core_id")),
                numa_node=_cpu_node(reader, d, cpu_id, cpu_to_node),
                thread_siblings=siblings if siblings else CPUSet.of([cpu_id]),
                l2_cache=l2,
                l3_cache=l3,
                isolated=cpu_id in isolated,
                nohz_full=cpu_id in nohz_full,
                core_type=core_types.get(cpu_id),
            )
        )
    return tuple(cpus)


def _is_online(reader: _Reader, cpu_dir: str, cpu_id: int, online: CPUSet | None) -> bool:
    if online is not None:
        return cpu_id in online
    flag = reader.int(f"{cpu_dir}/online")
    # Without an `online` file the CPU cannot be offlined (cpu0 on x86), so it is online.
    return flag is None or flag == 1


def _known_id(value: int | None) -> int | None:
    return None if value is None or value in _NO_ID else value


def _cpu_node(reader: _Reader, cpu_dir: str, cpu_id: int, cpu_to_node: dict[int, int]) -> int | None:
    for name in reader.listdir(cpu_dir):
        match = _NODE_DIR.match(name)
        if match:
            return int(match.group(1))
    return cpu_to_node.get(cpu_id)


def _cache_ids(reader: _Reader, cpu_dir: str, l3_sizes: dict[int, int]) -> tuple[int | None, int | None]:
    ids: dict[int, int] = {}
    cache_dir = f"{cpu_dir}/cache"
    for name in sorted(reader.listdir(cache_dir)):
        if not _INDEX_DIR.match(name):
            continue
        level = reader.int(f"{cache_dir}/{name}/level")
        if level not in (2, 3) or level in ids:
            continue
        cache_id = reader.int(f"{cache_dir}/{name}/id")
        if cache_id is None:
            # Older kernels and some firmware give no id: the lowest CPU sharing the cache names it uniquely.
            shared = reader.cpuset(f"{cache_dir}/{name}/shared_cpu_list")
            if not shared:
                continue
            cache_id = shared.first()
        ids[level] = cache_id
        if level == 3 and cache_id not in l3_sizes:
            l3_sizes[cache_id] = _cache_size(reader, f"{cache_dir}/{name}/size")
    return ids.get(2), ids.get(3)


def _cache_size(reader: _Reader, rel: str) -> int:
    """Bytes from the kernel's `16384K`; 0 where the file is missing."""
    content = (reader.text(rel) or "0").strip()
    number, unit = (content[:-1], 1024) if content.endswith("K") else (content, 1)
    if not number.isdigit():
        raise SysfsError(f"{reader.path(rel)}: expected a size such as 16384K, found {content!r}")
    return int(number) * unit


def _core_types(reader: _Reader) -> dict[int, str]:
    types: dict[int, str] = {}
    for pmu, kind in (("cpu_core", "performance"), ("cpu_atom", "efficiency")):
        cpus = reader.cpuset(f"sys/devices/{pmu}/cpus")
        for cpu in cpus or ():
            types[cpu] = kind
    return types


def _read_nodes(reader: _Reader) -> tuple[NumaNode, ...]:
    base = "sys/devices/system/node"
    if not reader.path(base).is_dir():
        return (_non_numa_node(reader),)
    online = reader.cpuset(f"{base}/online")
    if online is None:
        node_ids = sorted(int(m.group(1)) for m in map(_NODE_DIR.match, reader.listdir(base)) if m is not None)
        online = CPUSet.of(node_ids)
    if not online:
        return ()
    order = online.sorted()
    nodes = []
    for node_id in order:
        d = f"{base}/node{node_id}"
        if not reader.path(d).is_dir():
            raise SysfsError(
                f"sysfs: node{node_id} is online in {reader.path(f'{base}/online')} but {reader.path(d)} is missing"
            )
        nodes.append(
            NumaNode(
                id=node_id,
                cpus=reader.cpuset(f"{d}/cpulist") or CPUSet(),
                distances=_distances(reader, f"{d}/distance", order),
                memory_bytes=_node_mem_total(reader, f"{d}/meminfo"),
                hugepages=_read_hugepages(reader, f"{d}/hugepages", "nr_hugepages"),
            )
        )
    return tuple(nodes)


def _non_numa_node(reader: _Reader) -> NumaNode:
    """A kernel built without NUMA has no node folder: the whole machine is node 0."""
    online = reader.cpuset("sys/devices/system/cpu/online") or _present_cpus(reader)
    meminfo = reader.text("proc/meminfo") or ""
    match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    return NumaNode(
        id=0,
        cpus=online,
        distances=((0, 10),),
        memory_bytes=int(match.group(1)) * 1024 if match else 0,
        hugepages=_read_hugepages(reader, "sys/kernel/mm/hugepages", "nr_hugepages"),
    )


def _distances(reader: _Reader, rel: str, order: list[int]) -> tuple[tuple[int, int], ...]:
    content = reader.text(rel)
    if content is None:
        return ()
    fields = content.split()
    if len(fields) != len(order) or not all(f.isdigit() for f in fields):
        raise SysfsError(
            f"{reader.path(rel)}: expected {len(order)} distances for online nodes {order}, found {content.strip()!r}"
        )
    # The kernel prints one distance per online node, in node order.
    return tuple(zip(order, (int(f) for f in fields), strict=True))


def _node_mem_total(reader: _Reader, rel: str) -> int:
    content = reader.text(rel)
    if content is None:
        return 0
    for line in content.splitlines():
        fields = line.split()
        # "Node 0 MemTotal:       467628 kB"
        if len(fields) >= 4 and fields[2] == "MemTotal:":
            if not fields[3].isdigit():
                raise SysfsError(f"{reader.path(rel)}: MemTotal is not a number: {line.strip()!r}")
            return int(fields[3]) * 1024
    raise SysfsError(f"{reader.path(rel)}: no MemTotal line")


def _read_hugepages(reader: _Reader, rel: str, total_file: str) -> tuple[HugePagePool, ...]:
    pools = []
    for name in reader.listdir(rel):
        match = _HUGEPAGE_DIR.match(name)
        if not match:
            continue
        total = reader.int(f"{rel}/{name}/{total_file}")
        free = reader.int(f"{rel}/{name}/free_hugepages")
        pools.append(HugePagePool(size_kib=int(match.group(1)), total=total or 0, free=free or 0))
    return tuple(sorted(pools, key=lambda p: p.size_kib))


def _read_pcie_roots(reader: _Reader, nodes: tuple[NumaNode, ...]) -> tuple[PcieRoot, ...]:
    """Each root complex with a PCI device on its root bus (one without devices has nothing to be near), by name."""
    roots = []
    for name in sorted(reader.listdir("sys/devices")):
        match = _PCI_ROOT_DIR.match(name)
        if match is None:
            continue
        rel = f"sys/devices/{name}"
        devices = _root_bus_devices(reader, rel, match.group(1), match.group(2))
        if devices:
            roots.append(PcieRoot(name=name, numa_node=_pcie_root_node(reader, rel, devices, nodes)))
    return tuple(roots)


def _root_bus_devices(reader: _Reader, rel: str, domain: str, bus: str) -> list[str]:
    """The PCI devices directly under a root: those on its root bus (not pci_bus/, power/, firmware_node or
    non-PCI children such as QEMU0002:00)."""
    devices = []
    for name in sorted(reader.listdir(rel)):
        match = _PCI_DEVICE_DIR.match(name)
        if match is None:
            continue
        if (match.group(1), match.group(2)) != (domain, bus):
            raise SysfsError(f"sysfs: {reader.path(f'{rel}/{name}')} is not on the root bus {domain}:{bus} it is under")
        devices.append(name)
    return devices


def _pcie_root_node(reader: _Reader, rel: str, devices: list[str], nodes: tuple[NumaNode, ...]) -> int | None:
    """The NUMA node the root bus's devices agree on; None for -1, or where no device has a numa_node file (a
    kernel without NUMA)."""
    found: tuple[str, int] | None = None
    for name in devices:
        file = f"{rel}/{name}/numa_node"
        node = reader.int(file)
        if node is None:
            continue
        if node < -1:
            raise SysfsError(f"{reader.path(file)}: expected a NUMA node or -1, found {node}")
        if node >= 0 and all(n.id != node for n in nodes):
            online = ",".join(str(n.id) for n in nodes) or "none"
            raise SysfsError(f"{reader.path(file)}: NUMA node {node} is not online (online nodes: {online})")
        if found is not None and found[1] != node:
            raise SysfsError(
                f"sysfs: devices on one PCIe root bus disagree on its NUMA node: {reader.path(found[0])} says "
                f"{found[1]}, {reader.path(file)} says {node}"
            )
        found = (file, node)
    return None if found is None or found[1] < 0 else found[1]


def _cpu_model(reader: _Reader) -> str:
    content = reader.text("proc/cpuinfo")
    for line in (content or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return ""
