"""Writes sysfs trees in the kernel's layout, for tests of odd machines and for benchmarks of big ones.

The layout follows what Linux 6.x exposes; only the files that sysfs.py reads are written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dra_cpu.core.cpuset import CPUSet


@dataclass(frozen=True)
class SyntheticCpu:
    """One CPU of a synthetic machine: where it sits (socket, die, core, NUMA node), its siblings and caches."""

    id: int
    socket: int = 0
    die: int = 0
    core: int = 0
    node: int = 0
    siblings: CPUSet = field(default_factory=CPUSet)
    l2: int | None = None
    l3: int | None = 0
    online: bool = True
    # Write the cache `id` file; old kernels lack it and the reader falls back to shared_cpu_list.
    cache_ids: bool = True
    cluster_id: int = 65535


@dataclass(frozen=True)
class SyntheticNode:
    id: int
    cpus: CPUSet
    mem_total_kb: int = 1048576
    # page size in kB -> (nr, free)
    hugepages: dict[int, tuple[int, int]] = field(default_factory=dict)


def write_tree(
    root: Path,
    cpus: list[SyntheticCpu],
    nodes: list[SyntheticNode],
    *,
    isolated: CPUSet | None = None,
    nohz_full: CPUSet | None = None,
    distances: dict[tuple[int, int], int] | None = None,
    model: str = "Synthetic CPU",
) -> Path:
    cpu_dir = root / "sys/devices/system/cpu"
    present = CPUSet.of(c.id for c in cpus)
    online = CPUSet.of(c.id for c in cpus if c.online)
    _write(cpu_dir / "present", str(present))
    _write(cpu_dir / "possible", str(present))
    _write(cpu_dir / "online", str(online))
    _write(cpu_dir / "offline", str(present - online))
    _write(cpu_dir / "isolated", str(isolated or CPUSet()))
    if nohz_full is not None:
        _write(cpu_dir / "nohz_full", str(nohz_full) if nohz_full else "(null)")
    for cpu in cpus:
        _write_cpu(cpu_dir / f"cpu{cpu.id}", cpu, cpus)
    node_dir = root / "sys/devices/system/node"
    node_ids = [n.id for n in nodes]
    _write(node_dir / "online", str(CPUSet.of(node_ids)))
    _write(node_dir / "possible", str(CPUSet.of(node_ids)))
    for node in nodes:
        d = node_dir / f"node{node.id}"
        _write(d / "cpulist", str(node.cpus))
        row = [
            (distances or {}).get(
                (node.id, other), (distances or {}).get((other, node.id), 10 if other == node.id else 20)
            )
            for other in node_ids
        ]
        _write(d / "distance", " ".join(map(str, row)))
        _write(d / "meminfo", f"Node {node.id} MemTotal:       {node.mem_total_kb} kB\nNode {node.id} MemFree: 1 kB\n")
        for size_kb, (nr, free) in node.hugepages.items():
            _write(d / f"hugepages/hugepages-{size_kb}kB/nr_hugepages", str(nr))
            _write(d / f"hugepages/hugepages-{size_kb}kB/free_hugepages", str(free))
    sizes = sorted({size for n in nodes for size in n.hugepages})
    for size_kb in sizes:
        d = root / f"sys/kernel/mm/hugepages/hugepages-{size_kb}kB"
        _write(d / "nr_hugepages", str(sum(n.hugepages.get(size_kb, (0, 0))[0] for n in nodes)))
        _write(d / "free_hugepages", str(sum(n.hugepages.get(size_kb, (0, 0))[1] for n in nodes)))
    _write(root / "proc/cpuinfo", "".join(f"processor\t: {c.id}\nmodel name\t: {model}\n\n" for c in cpus))
    return root


def _write_cpu(d: Path, cpu: SyntheticCpu, all_cpus: list[SyntheticCpu]) -> None:
    if cpu.id != 0:
        _write(d / "online", "1" if cpu.online else "0")
    _write(d / f"node{cpu.node}", "")
    if not cpu.online:
        # The kernel removes topology and cache folders of offline CPUs.
        return
    siblings = cpu.siblings or CPUSet.of([cpu.id])
    topo = d / "topology"
    _write(topo / "physical_package_id", str(cpu.socket))
    _write(topo / "die_id", str(cpu.die))
    _write(topo / "core_id", str(cpu.core))
    _write(topo / "cluster_id", str(cpu.cluster_id))
    _write(topo / "thread_siblings_list", str(siblings))
    _write(topo / "core_cpus_list", str(siblings))
    index = 0
    for level, cache_id in ((1, cpu.core), (2, cpu.l2), (3, cpu.l3)):
        if cache_id is None:
            continue
        sharing = (
            siblings if level == 1 else CPUSet.of(c.id for c in all_cpus if c.online and _cache(c, level) == cache_id)
        )
        cache = d / f"cache/index{index}"
        _write(cache / "level", str(level))
        _write(cache / "type", "Data" if level == 1 else "Unified")
        _write(cache / "shared_cpu_list", str(sharing))
        if cpu.cache_ids:
            _write(cache / "id", str(cache_id))
        index += 1


def uniform_machine(
    sockets: int, nodes_per_socket: int, cores_per_node: int, threads: int, l3_per_node: int = 1
) -> tuple[list[SyntheticCpu], list[SyntheticNode]]:
    """A regular machine, numbered as Linux numbers most servers: thread t of core c is CPU t * cores + c."""
    total_cores = sockets * nodes_per_socket * cores_per_node
    cores_per_l3 = max(1, cores_per_node // l3_per_node)
    cpus: list[SyntheticCpu] = []
    for core in range(total_cores):
        node = core // cores_per_node
        siblings = CPUSet.of(t * total_cores + core for t in range(threads))
        for t in range(threads):
            cpus.append(
                SyntheticCpu(
                    id=t * total_cores + core,
                    socket=node // nodes_per_socket,
                    die=node % nodes_per_socket,
                    core=core % (nodes_per_socket * cores_per_node),
                    node=node,
                    siblings=siblings,
                    l2=core,
                    l3=core // cores_per_l3,
                )
            )
    cpus.sort(key=lambda c: c.id)
    nodes = [
        SyntheticNode(id=n, cpus=CPUSet.of(c.id for c in cpus if c.node == n), hugepages={2048: (0, 0)})
        for n in range(sockets * nodes_per_socket)
    ]
    return cpus, nodes


ONE_STEP_CASES = {"lone-isolated-cpu": ("7", False), "one-isolated-core": ("3,7", True)}
"""Name -> (isolated CPUs, whole cores) of `one_step_machine`: a device whose capacity is its one step."""


def one_step_machine(root: Path, isolated: str) -> Path:
    """Two NUMA nodes of two 2-thread cores (node 1: cores 2 and 3, CPUs 2,6 and 3,7) with `isolated` CPUs, and one
    1 GiB page reserved on node 0: devices whose capacity is a single step of their request policy, with
    ONE_STEP_CASES (the isolated device; with whole cores, one core) and always (the pool of one page)."""
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=2, cores_per_node=2, threads=2)
    nodes[0] = SyntheticNode(id=0, cpus=nodes[0].cpus, hugepages={2048: (0, 0), 1048576: (1, 1)})
    return write_tree(root, cpus, nodes, isolated=CPUSet.parse(isolated))


def _cache(cpu: SyntheticCpu, level: int) -> int | None:
    return cpu.l2 if level == 2 else cpu.l3


def _write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content + ("\n" if content and not content.endswith("\n") else ""))


def write_pcie_root(root: Path, name: str, devices: dict[str, int | None]) -> Path:
    """A PCIe root complex sys/devices/<name> (`pci0000:10`) with PCI devices on its root bus: BDF -> numa_node
    (None: no numa_node file, as on a kernel without NUMA), and its pci_bus folder as the kernel has it."""
    d = root / "sys/devices" / name
    _write(d / "pci_bus" / name[3:] / "uevent", "")
    for bdf, node in devices.items():
        if node is None:
            _write(d / bdf / "vendor", "0x1af4")
        else:
            _write(d / bdf / "numa_node", str(node))
    return d
