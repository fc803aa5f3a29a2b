"""Which exact CPUs a claim gets inside a device: (topology, free CPUs, count, policy) -> CPUSet. Pure.

One rule places every claim. Of all the ways to take `count` of the free CPUs, it returns the best by these
objectives, each deciding only between placements that tie on the ones before it (docs/design.md, "Placement"):

1. whole free cores: as many of the claim's CPUs as whole cores none of whose online threads another claim holds,
   so that the claim shares no core's caches and execution units; only a remainder smaller than a core (the odd CPU
   with SMT-2) comes as single threads. Cores of different widths (an offline sibling, hybrid parts, SMT-4) count
   by their own width;
2. as few NUMA nodes as that allows, then
3. as few L3 groups as that allows;
4. the remainder from leftover threads (of cores another claim already holds part of) before splitting a fresh
   core, so that fresh cores stay whole for the next claim;
5. the tightest fit: the NUMA nodes, then the L3 groups, with the fewest free CPUs, so that big free blocks stay
   for big claims;
6. determinism: on a tie, the lowest CPU ids. The same inputs always give the same CPUs.

The policies of a claim's CPUConfig are variations of the rule, not other rules: `wholeCores` turns 1 into a
requirement (no remainder at all); `alignL3` turns 3 into one (a single L3 group or a refusal); `spread` reverses
2 and 3 (the whole cores are dealt out over the L3 groups and NUMA nodes in turn: memory-bandwidth-bound work gains
from more caches and memory channels); `distributeAcrossNUMA` applies the rule to an equal share on every NUMA node
of the device.

Objectives 2 and 3 are searched exactly: the sets of NUMA nodes, then of L3 groups, are tried smallest first, every
set of a size before the next size (up to `_MAX_SETS` sets per level, beyond which the largest-first sets are tried,
which finds the minimum on every regular machine). What the search compares is per set: its free CPUs, its leftover
threads and the widths of its whole free cores (which sums of whole cores it can give), so it is cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from math import comb
from typing import NamedTuple

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError

# Sets of NUMA nodes or of L3 groups of one size compared one by one when there are at most this many (every size
# up to 6 nodes or L3 groups, 2 of up to 8): beyond, the sets made of the largest and one more (see _levels).
_MAX_SETS = 32


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
    return _choose(_cores(topology, free), count, policy)


def _distribute(topology: Topology, free: CPUSet, count: int, policy: AllocationPolicy, device: CPUSet) -> CPUSet:
    nodes = {node.id: node.cpus & device for node in topology.numa_nodes if not node.cpus.isdisjoint(device)}
    without_node = device - CPUSet.union_all(nodes.values())
    if without_node:
        nodes[-1] = without_node
    if count % len(nodes):
        raise AllocationError(
            f"distributeAcrossNUMA: {count} CPUs do not divide into equal shares over the device's "
            f"{len(nodes)} NUMA nodes ({CPUSet.of(nodes)})"
        )
    share = count // len(nodes)
    inner = replace(policy, distribute_across_numa=False)
    cores = _cores(topology, free & device)
    chosen: set[int] = set()
    for node, cpus in sorted(nodes.items()):
        room = cpus & free
        if len(room) < share:
            raise AllocationError(
                f"distributeAcrossNUMA: NUMA node {node} has {len(room)} free CPU(s) ({room or 'none'}), "
                f"its share is {share}"
            )
        try:
            chosen |= _choose([core for core in cores if core.node == node], share, inner).ids
        except AllocationError as err:
            raise AllocationError(f"distributeAcrossNUMA: NUMA node {node}, share of {share}: {err}") from None
    return CPUSet(frozenset(chosen))


class _Core(NamedTuple):
    """A physical core with at least one free thread: fresh when all its online threads are free (a whole free
    core), a leftover otherwise (another claim holds the rest). A NamedTuple: hundreds are made per choice."""

    free: tuple[int, ...]
    width: int
    node: int
    l3: int

    @property
    def fresh(self) -> bool:
        return len(self.free) == self.width


def _cores(topology: Topology, free: CPUSet) -> list[_Core]:
    """The cores of the free online CPUs, by first CPU. CPUs without a NUMA node count as node -1, CPUs without an
    L3 as an L3 group of their own (as Topology.l3_groups has them)."""
    cpu = topology.cpu
    threads: dict[frozenset[int], list[int]] = {}
    for i in sorted(free.ids):
        info = cpu(i)
        if info.online:
            siblings = info.thread_siblings.ids
            threads.setdefault(siblings if i in siblings else frozenset((i,)), []).append(i)
    cores = []
    for siblings, ids in threads.items():
        info = cpu(ids[0])
        node = -1 if info.numa_node is None else info.numa_node
        cores.append(_Core(tuple(ids), len(siblings), node, -1 - ids[0] if info.l3_cache is None else info.l3_cache))
    return cores


@dataclass
class _Cell:
    """The free cores one NUMA node and one L3 group share: the unit the search combines."""

    node: int
    l3: int
    cores: list[_Core] = field(default_factory=list)


class _Room(NamedTuple):
    """What a set of cells can give: free CPUs, leftover threads and the widths of its whole free cores."""

    cells: tuple[_Cell, ...]
    free: int
    leftover: int
    # width -> number of whole free cores of that width
    widths: tuple[tuple[int, int], ...]
    # Its lowest free CPU: the last tie-breaker.
    first: int

    @staticmethod
    def of(cell: _Cell) -> _Room:
        free = leftover = 0
        widths: dict[int, int] = {}
        for core in cell.cores:
            free += len(core.free)
            if core.fresh:
                widths[core.width] = widths.get(core.width, 0) + 1
            else:
                leftover += len(core.free)
        return _Room((cell,), free, leftover, tuple(sorted(widths.items())), cell.cores[0].free[0])

    @staticmethod
    def union(rooms: Sequence[_Room]) -> _Room:
        if len(rooms) == 1:
            return rooms[0]
        widths: dict[int, int] = {}
        for room in rooms:
            for width, number in room.widths:
                widths[width] = widths.get(width, 0) + number
        return _Room(
            tuple(c for r in rooms for c in r.cells),
            sum(r.free for r in rooms),
            sum(r.leftover for r in rooms),
            tuple(sorted(widths.items())),
            min(r.first for r in rooms),
        )

    @property
    def whole_cpus(self) -> int:
        return self.free - self.leftover

    def whole(self, count: int) -> int:
        """The most CPUs of a claim of `count` that whole free cores of this room can give."""
        if len(self.widths) == 1:
            width, number = self.widths[0]
            return min(number, count // width) * width
        return _sums(self.widths, count).bit_length() - 1

    def gives(self, count: int, whole: int) -> bool:
        """Whether `count` CPUs fit, `whole` of them as whole free cores."""
        if self.free < count or self.whole_cpus < whole:
            return False
        if len(self.widths) == 1:
            return whole % self.widths[0][0] == 0
        return bool(_sums(self.widths, whole) >> whole & 1)


def _sums(widths: Iterable[tuple[int, int]], cap: int) -> int:
    """The sums up to `cap` that whole cores of these widths add up to, as a bit set (bit s: sum s)."""
    reach, mask = 1, (1 << (cap + 1)) - 1
    for width, number in widths:
        # Bounded knapsack by binary splitting: bundles of 1, 2, 4, ... cores reach every number up to `number`.
        bundle, left = 1, number
        while left > 0:
            take = min(bundle, left)
            reach |= (reach << (width * take)) & mask
            left -= take
            bundle *= 2
    return reach


def _choose(cores: list[_Core], count: int, policy: AllocationPolicy) -> CPUSet:
    cells: dict[tuple[int, int], _Cell] = {}
    for core in cores:
        cells.setdefault((core.node, core.l3), _Cell(core.node, core.l3)).cores.append(core)
    rooms = [_Room.of(cell) for cell in cells.values()]
    everything = _Room.union(rooms)
    if everything.free < count:
        raise AllocationError(f"{count} CPUs requested but only {everything.free} of the free CPUs are online")
    if policy.align_l3:
        groups = _unions(rooms, lambda c: c.l3)
        fitting = [room for room in groups if room.free >= count]
        if not fitting:
            largest = max(room.free for room in groups)
            raise AllocationError(
                f"alignL3: no single L3 group has {count} free CPUs (the most free in one group is {largest})"
            )
        whole = max(room.whole(count) for room in fitting)
    else:
        whole = everything.whole(count)
    if policy.whole_cores and whole != count:
        raise _not_whole(everything, count, policy.align_l3)
    if policy.spread:
        return _take(everything, count, whole, _dealt(everything.cells), interleave=True)
    room = _best_room(rooms, count, whole, single_l3=policy.align_l3)
    return _take(room, count, whole, sorted(room.cells, key=_tightness), interleave=False)


def _not_whole(everything: _Room, count: int, align_l3: bool) -> AllocationError:
    widths = {w for w, _ in everything.widths}
    if len(widths) == 1 and count % next(iter(widths)):
        return AllocationError(
            f"wholeCores: {count} CPUs is not a whole number of cores ({next(iter(widths))} threads per core)"
        )
    available = sum(w * n for w, n in everything.widths)
    if available < count:
        return AllocationError(f"wholeCores: {count} CPUs requested but only {available} CPUs form whole free cores")
    where = " of one L3 group" if align_l3 else ""
    return AllocationError(
        f"wholeCores: no whole free cores{where} add up to exactly {count} CPUs (free whole cores by width: "
        + ", ".join(f"{n} of {w} threads" for w, n in everything.widths)
        + ")"
    )


def _unions(rooms: Iterable[_Room], key: Callable[[_Cell], int]) -> list[_Room]:
    """The rooms of single cells merged by a key of their cell: per NUMA node or per L3 group, in key order."""
    groups: dict[int, list[_Room]] = {}
    for room in rooms:
        groups.setdefault(key(room.cells[0]), []).append(room)
    return [_Room.union(groups[k]) for k in sorted(groups)]


def _best_room(rooms: list[_Room], count: int, whole: int, single_l3: bool) -> _Room:
    """The cells to place the claim in, by objectives 2 to 6: among the sets of NUMA nodes of the smallest size
    that can give `count` CPUs with `whole` of them as whole cores, and within each among its sets of L3 groups of
    the smallest size: no fresh core split if its leftover threads suffice, then the tightest NUMA nodes, the
    tightest L3 groups, the lowest CPU. alignL3 allows sets of one L3 group only. `rooms` are one per cell."""
    of_cell = {id(room.cells[0]): room for room in rooms}
    for node_level in _levels(_unions(rooms, lambda c: c.node), count, whole):
        best: tuple[tuple[int, ...], _Room] | None = None
        for node_room in sorted(node_level, key=lambda r: (r.free, r.first)):
            l3_groups = _unions((of_cell[id(c)] for c in node_room.cells), lambda c: c.l3)
            max_size = 1 if single_l3 else len(l3_groups) if best is None else best[0][0]
            for l3_level in _levels(l3_groups, count, whole, max_size):
                for room in l3_level:
                    split = int(room.leftover < count - whole)
                    key = (len({c.l3 for c in room.cells}), split, node_room.free, room.free, room.first)
                    if best is None or key < best[0]:
                        best = (key, room)
                if l3_level:
                    break
        if best is not None:
            return best[1]
    # Unreachable: the device as a whole gives `whole` (it was computed from it), and alignL3 checked its groups.
    raise AllocationError(f"no placement of {count} CPUs with {whole} as whole cores")


def _levels(groups: list[_Room], count: int, whole: int, max_size: int | None = None) -> Iterator[list[_Room]]:
    """Per number of groups, smallest first: the unions of that many groups that can give `count` CPUs with `whole`
    of them as whole cores. Every union where there are at most _MAX_SETS; beyond, those of the largest groups
    (by free CPUs, or by whole-core CPUs) and one more, each other group in turn: the largest are taken whole and
    the last fits the rest most tightly."""
    by_free = sorted(range(len(groups)), key=lambda i: (-groups[i].free, groups[i].first))
    by_whole = sorted(range(len(groups)), key=lambda i: (-groups[i].whole_cpus, -groups[i].free, groups[i].first))
    for size in range(1, min(len(groups), max_size or len(groups)) + 1):
        if sum(groups[i].free for i in by_free[:size]) < count:
            continue
        if sum(groups[i].whole_cpus for i in by_whole[:size]) < whole:
            continue
        if comb(len(groups), size) <= _MAX_SETS:
            sets: Iterable[tuple[int, ...]] = combinations(by_free, size)
        else:
            sets = dict.fromkeys((*base[: size - 1], i) for base in (by_free, by_whole) for i in base[size - 1 :])
        unions = (_Room.union([groups[i] for i in chosen]) for chosen in sets)
        yield [room for room in unions if room.gives(count, whole)]


def _tightness(cell: _Cell) -> tuple[int, int]:
    return (sum(len(core.free) for core in cell.cores), cell.cores[0].free[0])


def _dealt(cells: Sequence[_Cell]) -> list[_Cell]:
    """The cells of spread in the order its cores are dealt: one cell of every L3 group in turn, alternating over
    the NUMA nodes, before a second cell (another NUMA node) of an L3 group."""
    l3_rank = {id(c): sum(1 for o in cells if o.l3 == c.l3 and o.node < c.node) for c in cells}
    node_rank = {id(c): sum(1 for o in cells if o.node == c.node and o.l3 < c.l3) for c in cells}
    return sorted(cells, key=lambda c: (l3_rank[id(c)], node_rank[id(c)], c.node, c.l3))


def _take(room: _Room, count: int, whole: int, cells: Sequence[_Cell], interleave: bool) -> CPUSet:
    """The CPUs of a placement in `room`: whole free cores adding up to `whole`, the earliest in the order of
    `cells` (interleaved over them for spread); then leftover threads, those of the fullest cores first; then the
    fresh core that fits the rest most tightly, split."""
    fresh = _ordered([[c for c in cell.cores if c.fresh] for cell in cells], interleave)
    taken = _subset_summing(fresh, whole)
    chosen = [cpu for core in taken for cpu in core.free]
    taken_ids = {id(core) for core in taken}
    leftovers = _ordered([[c for c in cell.cores if not c.fresh] for cell in cells], interleave)
    if not interleave:
        leftovers.sort(key=lambda c: len(c.free))
    untouched = sorted((c for c in fresh if id(c) not in taken_ids), key=lambda c: c.width)
    for core in [*leftovers, *untouched]:
        if len(chosen) == count:
            break
        chosen.extend(core.free[: count - len(chosen)])
    return CPUSet(frozenset(chosen))


def _ordered(per_cell: list[list[_Core]], interleave: bool) -> list[_Core]:
    """Cores cell after cell, or interleaved: the first core of every cell, then the second of every cell, ..."""
    if not interleave:
        return [core for cores in per_cell for core in cores]
    ranked = [(rank, i, core) for i, cores in enumerate(per_cell) for rank, core in enumerate(cores)]
    return [core for _, _, core in sorted(ranked, key=lambda r: (r[0], r[1]))]


def _subset_summing(cores: list[_Core], total: int) -> list[_Core]:
    """The earliest cores (in list order) whose widths add up to exactly `total` (the caller knows they can)."""
    if len({c.width for c in cores}) <= 1:
        return cores[: total // cores[0].width] if cores else []
    # reach[i]: the sums the cores from i on add up to, so that a core is taken only when the rest can complete it.
    mask = (1 << (total + 1)) - 1
    reach = [1] * (len(cores) + 1)
    for i in range(len(cores) - 1, -1, -1):
        reach[i] = reach[i + 1] | (reach[i + 1] << cores[i].width) & mask
    chosen: list[_Core] = []
    need = total
    for i, core in enumerate(cores):
        if need >= core.width and reach[i + 1] >> (need - core.width) & 1:
            chosen.append(core)
            need -= core.width
    return chosen
