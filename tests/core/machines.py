"""Topology values of machines no sysfs capture has, built from their cores: cores of mixed widths (an offline
sibling, hybrid parts, SMT-4), one L3 over several NUMA nodes, many small L3 groups. For the allocator's tests and
hack/bench/cpu_choice.py."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Cpu, NumaNode, Topology


@dataclass(frozen=True)
class CoreSpec:
    """One physical core: its CPU ids (those in `offline` are present but offline), NUMA node, L3 group, socket."""

    cpus: tuple[int, ...]
    node: int
    l3: int
    socket: int = 0
    offline: tuple[int, ...] = ()
    core_type: str | None = None


def machine(cores: Iterable[CoreSpec], model: str = "synthetic") -> Topology:
    cpus: list[Cpu] = []
    for index, core in enumerate(cores):
        siblings = CPUSet.of(c for c in core.cpus if c not in core.offline)
        for cpu in core.cpus:
            online = cpu not in core.offline
            cpus.append(
                Cpu(
                    id=cpu,
                    online=online,
                    socket=core.socket if online else None,
                    core=index if online else None,
                    numa_node=core.node,
                    thread_siblings=siblings if online else CPUSet(),
                    l2_cache=index if online else None,
                    l3_cache=core.l3 if online else None,
                    core_type=core.core_type if online else None,
                )
            )
    cpus.sort(key=lambda c: c.id)
    node_ids = sorted({c.numa_node for c in cpus if c.numa_node is not None})
    nodes = tuple(
        NumaNode(
            id=n,
            cpus=CPUSet.of(c.id for c in cpus if c.numa_node == n and c.online),
            distances=tuple((o, 10 if o == n else 20) for o in node_ids),
            memory_bytes=1 << 30,
        )
        for n in node_ids
    )
    return Topology(cpus=tuple(cpus), numa_nodes=nodes, smt_active=any(len(c.thread_siblings) > 1 for c in cpus))


def regular(
    nodes: int,
    cores_per_node: int,
    threads: int,
    *,
    l3_per_node: int = 1,
    nodes_per_l3: int = 1,
    nodes_per_socket: int = 1,
    offline: Sequence[int] = (),
) -> Topology:
    """Numbered as Linux numbers most servers: thread t of core c is CPU t * (all cores) + c. An L3 group is
    `cores_per_node // l3_per_node` cores of a node, or with `nodes_per_l3` > 1 spans that many whole nodes."""
    total = nodes * cores_per_node
    per_l3 = cores_per_node // l3_per_node
    specs = []
    for core in range(total):
        node = core // cores_per_node
        l3 = node // nodes_per_l3 if nodes_per_l3 > 1 else core // per_l3
        specs.append(
            CoreSpec(
                tuple(t * total + core for t in range(threads)),
                node,
                l3,
                socket=node // nodes_per_socket,
                offline=tuple(c for c in offline if c % total == core),
            )
        )
    return machine(specs)
