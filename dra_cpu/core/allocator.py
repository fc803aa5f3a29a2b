"""Which exact CPUs a claim gets inside a device: (topology, free CPUs, count, policy) -> CPUSet. Pure.

The order of preference, as the kubelet's static policy and nri-plugins' topology-aware policy teach:
1. whole free cores, so that no two workloads share a core's caches and execution units;
2. one NUMA node when the device spans several (socket and machine devices) and one has room, the one whose
   placement is best by 1 and 3, then the tightest;
3. one L3 group when the request fits in one, choosing the group that fits most tightly so that big groups stay
   free for big requests;
4. otherwise the fewest L3 groups: whole groups, largest first, then the tightest fit for the rest.
With `spread` the claim asks for the opposite of 2 to 4: its cores are dealt out over the L3 groups in turn
(memory-bandwidth-bound work gains from more caches and memory channels). With `distribute_across_numa` the claim
gets an equal share on every NUMA node of its device, each share placed by the rules above.
Every choice is deterministic: the same inputs give the same CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError


class AllocationError(DraCpuError):
    """The device cannot give this request what it asks; the message says what is free."""


@dataclass(frozen=True)
class AllocationPolicy:
    whole_cores: bool = False
    # Strict: fail rather than cross an L3 boundary. Without it one L3 group is only preferred.
    align_l3: bool = False
    spread: bool = False
    # Equal shares on every NUMA node of the device (the kubelet's distribute-cpus-across-numa, per claim).
    distribute_across_numa: bool = False


def choose_cpus(
    topology: Topology, free: CPUSet, count: int, policy: AllocationPolicy, device: CPUSet | None = None
) -> CPUSet:
    """`count` CPUs of `free`, the free CPUs of a device whose CPUs are `device` (default: `free`)."""
    if count <= 0:
        raise AllocationError(f"CPU count {count} must be positive")
    if count > len(free):
        raise AllocationError(f"{count} CPUs requested but only {len(free)} are free ({free or 'none'})")
    if policy.distribute_across_numa:
        return _distribute(topology, free, count, policy, free if device is None else device)
    nodes = _by_numa(topology, free)
    if len(nodes) > 1 and not policy.spread:
        return _numa_first(topology, free, nodes, count, policy)
    return _place(topology, free, count, policy)


def _by_numa(topology: Topology, cpus: CPUSet) -> dict[int, CPUSet]:
    """CPUs by NUMA node (CPUs the kernel gives no node count as node -1)."""
    nodes: dict[int, set[int]] = {}
    for cpu in cpus:
        node = topology.cpu(cpu).numa_node
        nodes.setdefault(-1 if node is None else node, set()).add(cpu)
    return {node: CPUSet.of(ids) for node, ids in sorted(nodes.items())}


def _numa_first(
    topology: Topology, free: CPUSet, nodes: dict[int, CPUSet], count: int, policy: AllocationPolicy
) -> CPUSet:
    """The best placement inside one NUMA node if one keeps the whole-core promise; otherwise the whole device."""
    candidates = []
    for node, cpus in nodes.items():
        if len(cpus) < count:
            continue
        try:
            chosen = _place(topology, cpus, count, policy)
        except AllocationError:
            continue
        candidates.append(
            (_broken_cores(topology, cpus, chosen), len(topology.l3_groups(chosen)), len(cpus), node, chosen)
        )
    if candidates:
        broken, *_, chosen = min(candidates)
        if broken <= count % topology.threads_per_core or not _whole_cores_possible(topology, free, count):
            return chosen
    return _place(topology, free, count, policy)


def _broken_cores(topology: Topology, free: CPUSet, chosen: CPUSet) -> int:
    """Whole free cores of which `chosen` takes some threads but not all."""
    return sum(1 for core in _full_cores(topology, free) if 0 < len(core & chosen) < len(core))


def _full_cores(topology: Topology, free: CPUSet) -> list[CPUSet]:
    return [core for core in topology.cores(free) if core == topology.cpu(core.first()).thread_siblings]


def _whole_cores_possible(topology: Topology, free: CPUSet, count: int) -> bool:
    return sum(len(core) for core in _full_cores(topology, free)) >= count - count % topology.threads_per_core


def _distribute(topology: Topology, free: CPUSet, count: int, policy: AllocationPolicy, device: CPUSet) -> CPUSet:
    nodes = _by_numa(topology, device)
    if count % len(nodes):
        raise AllocationError(
            f"distributeAcrossNUMA: {count} CPUs do not divide into equal shares over the device's "
            f"{len(nodes)} NUMA nodes ({CPUSet.of(nodes)})"
        )
    share = count // len(nodes)
    inner = replace(policy, distribute_across_numa=False)
    chosen = CPUSet()
    for node, cpus in nodes.items():
        room = cpus & free
        if len(room) < share:
            raise AllocationError(
                f"distributeAcrossNUMA: NUMA node {node} has {len(room)} free CPU(s) ({room or 'none'}), "
                f"its share is {share}"
            )
        try:
            chosen |= _place(topology, room, share, inner)
        except AllocationError as err:
            raise AllocationError(f"distributeAcrossNUMA: NUMA node {node}, share of {share}: {err}") from None
    return chosen


def _place(topology: Topology, free: CPUSet, count: int, policy: AllocationPolicy) -> CPUSet:
    groups = [_Group(topology, cpus, policy.whole_cores) for cpus in topology.l3_groups(free).values()]
    if policy.whole_cores:
        _check_whole_cores(topology, groups, count)
    if policy.spread:
        return _spread(groups, count)
    # CPUs that a whole-core placement takes from whole free cores: all but an odd remainder.
    from_whole = count - count % topology.threads_per_core
    fitting = [g for g in groups if g.capacity >= count]
    whole = [g for g in fitting if g.whole_capacity >= from_whole]
    if whole or (fitting and sum(g.whole_capacity for g in groups) < from_whole):
        # Whole cores come first: an L3 group is chosen among those that can give them, if any can.
        return min(whole or fitting, key=lambda g: (g.capacity, g.cpus.first())).take(count)
    if policy.align_l3 and fitting:
        return min(fitting, key=lambda g: (g.capacity, g.cpus.first())).take(count)
    if policy.align_l3:
        largest = max(g.capacity for g in groups)
        raise AllocationError(
            f"alignL3: no single L3 group has {count} free CPUs (the most free in one group is {largest})"
        )
    return _fewest_groups(groups, count, from_whole)


class _Group:
    """The free CPUs of one L3 group, as cores: whole free cores first, then cores another claim already split."""

    def __init__(self, topology: Topology, cpus: CPUSet, whole_cores: bool) -> None:
        self.cpus = cpus
        cores = topology.cores(cpus)
        self.full = [c for c in cores if c == topology.cpu(c.first()).thread_siblings]
        self.partial = [] if whole_cores else [c for c in cores if c not in self.full]
        self.whole_capacity = sum(len(c) for c in self.full)
        self.capacity = self.whole_capacity + sum(len(c) for c in self.partial)

    def take(self, count: int) -> CPUSet:
        chosen = self.whole(count)
        return chosen | self.fill(count - len(chosen), chosen)

    def whole(self, count: int) -> CPUSet:
        """Whole cores while the rest of the request needs at least a whole core."""
        chosen: list[int] = []
        for core in self.full:
            if len(core) <= count - len(chosen):
                chosen.extend(core)
        return CPUSet.of(chosen)

    def fill(self, count: int, taken: CPUSet) -> CPUSet:
        """The odd remainder: from cores that are split already before splitting a whole one; tightest fit first."""
        chosen: list[int] = []
        leftovers = sorted(self.partial, key=lambda c: (len(c) < count, len(c), c.first()))
        for core in [*leftovers, *self.full]:
            for cpu in core - taken:
                if len(chosen) < count:
                    chosen.append(cpu)
        return CPUSet.of(chosen)


def _check_whole_cores(topology: Topology, groups: list[_Group], count: int) -> None:
    widths = {len(core) for g in groups for core in g.full}
    free_whole = sum(g.capacity for g in groups)
    if free_whole < count:
        raise AllocationError(f"wholeCores: {count} CPUs requested but only {free_whole} CPUs form whole free cores")
    if len(widths) == 1 and count % next(iter(widths)):
        raise AllocationError(
            f"wholeCores: {count} CPUs is not a whole number of cores ({topology.threads_per_core} threads per core)"
        )


def _fewest_groups(groups: list[_Group], count: int, from_whole: int) -> CPUSet:
    """Whole cores from as few L3 groups as possible (largest first, then the tightest fit), then the remainder."""
    whole_first = sum(g.whole_capacity for g in groups) >= from_whole

    def capacity(g: _Group) -> int:
        return g.whole_capacity if whole_first else g.capacity

    target = from_whole if whole_first else count
    chosen = CPUSet()
    used: list[_Group] = []
    rest = sorted(groups, key=lambda g: (-capacity(g), g.cpus.first()))
    while len(chosen) < target and rest:
        need = target - len(chosen)
        fitting = [g for g in rest if capacity(g) >= need]
        group = min(fitting, key=lambda g: (capacity(g), g.cpus.first())) if fitting else rest[0]
        chosen |= group.whole(need) if whole_first else group.take(min(need, group.capacity))
        rest.remove(group)
        used.append(group)
    for group in [*used, *rest]:
        chosen |= group.fill(count - len(chosen), chosen)
    _ensure_count(chosen, count)
    return chosen


def _spread(groups: list[_Group], count: int) -> CPUSet:
    """One whole core from each L3 group in turn, so the claim gets as many caches as its size allows; the odd
    remainder then comes from cores already split (dealt over the groups the same way), and splits a whole core only
    when nothing else is left."""
    whole = [list(g.full) for g in groups]
    chosen: list[int] = []
    dealt = True
    while dealt:
        dealt = False
        for queue in whole:
            if queue and len(queue[0]) <= count - len(chosen):
                chosen.extend(queue.pop(0))
                dealt = True
    for queues in ([list(g.partial) for g in groups], whole):
        while len(chosen) < count and any(queues):
            for queue in queues:
                if queue and len(chosen) < count:
                    chosen.extend(list(queue.pop(0))[: count - len(chosen)])
    result = CPUSet.of(chosen)
    _ensure_count(result, count)
    return result


def _ensure_count(chosen: CPUSet, count: int) -> None:
    if len(chosen) != count:
        raise AllocationError(f"could only place {len(chosen)} of {count} CPUs as whole cores")
