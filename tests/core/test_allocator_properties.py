"""The placement rule of core/allocator.py against a brute force over every set of `count` free CPUs, on random
small machines: cores of width 1, 2 and 4 mixed (offline siblings, hybrid parts, SMT-4), L3 groups per NUMA node,
several per node, or one over several nodes, and any CPUs taken by other claims."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dra_cpu.core.allocator import AllocationError, AllocationPolicy, choose_cpus
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from tests.core.machines import CoreSpec, machine

# Small enough for the brute force (at most C(12, 6) = 924 sets per example): the file runs in seconds.
MAX_CPUS = 12


@dataclass(frozen=True)
class Case:
    topology: Topology
    free: CPUSet
    count: int
    policy: AllocationPolicy


@st.composite
def machines(draw: st.DrawFn) -> Topology:
    nodes = draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["per-node", "two-per-node", "one-over-all", "one-over-pairs"]))
    specs: list[CoreSpec] = []
    next_cpu = 0
    for node in range(nodes):
        for index in range(draw(st.integers(1, 3))):
            width = draw(st.sampled_from([1, 2, 2, 4]))
            offline = draw(st.integers(0, width - 1)) if draw(st.integers(0, 4)) == 0 else 0
            if next_cpu + width - offline > MAX_CPUS:
                break
            l3 = {"per-node": node, "two-per-node": 2 * node + index % 2, "one-over-all": 0}.get(layout, node // 2)
            cpus = tuple(range(next_cpu, next_cpu + width))
            specs.append(CoreSpec(cpus, node, l3, offline=cpus[width - offline :]))
            next_cpu += width
    return machine(specs)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    topology = draw(machines())
    online = topology.online_cpus.sorted()
    taken = draw(st.sets(st.sampled_from(online), max_size=len(online) - 1))
    free = CPUSet.of(set(online) - taken)
    # Half the claims are large, so that placements over several NUMA nodes and L3 groups are common.
    count = draw(st.integers(1, len(free)) | st.integers(max(1, len(free) // 2), len(free)))
    policy = draw(
        st.sampled_from(
            [
                AllocationPolicy(),
                AllocationPolicy(whole_cores=True),
                AllocationPolicy(align_l3=True),
                AllocationPolicy(whole_cores=True, align_l3=True),
                AllocationPolicy(spread=True),
            ]
        )
    )
    return Case(topology, free, count, policy)


def _fresh_cores(topology: Topology, free: CPUSet) -> list[CPUSet]:
    return [core for core in topology.cores(free) if core == topology.cpu(core.first()).thread_siblings]


def _whole(topology: Topology, free: CPUSet, chosen: CPUSet) -> int:
    """CPUs of `chosen` that come as whole free cores."""
    return sum(len(core) for core in _fresh_cores(topology, free) if core.issubset(chosen))


def _cells(topology: Topology, cpus: Iterable[int]) -> set[tuple[int | None, int | None]]:
    return {(topology.cpu(c).numa_node, topology.cpu(c).l3_cache) for c in cpus}


def _score(topology: Topology, free: CPUSet, chosen: CPUSet) -> tuple[int, int, int]:
    """Objectives 1 to 3: whole-core CPUs (more is better), NUMA nodes, L3 groups (fewer is better)."""
    return (-_whole(topology, free, chosen), len(topology.numa_nodes_of(chosen)), len(topology.l3_groups(chosen)))


def _allowed(case: Case, chosen: CPUSet) -> bool:
    if case.policy.align_l3 and len(case.topology.l3_groups(chosen)) > 1:
        return False
    return not case.policy.whole_cores or _whole(case.topology, case.free, chosen) == case.count


def _best(case: Case) -> tuple[int, int, int] | None:
    """The best score of any placement the policy allows, by brute force (None: there is none)."""
    scores = [
        _score(case.topology, case.free, chosen)
        for chosen in map(CPUSet.of, combinations(case.free.sorted(), case.count))
        if _allowed(case, chosen)
    ]
    if not scores:
        return None
    if case.policy.spread:
        # spread only promises objective 1: it spreads over NUMA nodes and L3 groups rather than packing.
        return (min(scores)[0], 0, 0)
    return min(scores)


@settings(
    max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(cases())
def test_placement_is_as_good_as_the_best_by_brute_force(case: Case) -> None:
    best = _best(case)
    if best is None:
        with pytest.raises(AllocationError):
            choose_cpus(case.topology, case.free, case.count, case.policy)
        return
    chosen = choose_cpus(case.topology, case.free, case.count, case.policy)
    assert len(chosen) == case.count and chosen.issubset(case.free)
    assert chosen == choose_cpus(case.topology, case.free, case.count, case.policy), "deterministic"
    score = _score(case.topology, case.free, chosen)
    if case.policy.spread:
        score = (score[0], 0, 0)
    assert score == best, f"{chosen}: (-whole CPUs, NUMA nodes, L3 groups) {score}, the best is {best}"
    _check_scope(case, chosen)


def _check_scope(case: Case, chosen: CPUSet) -> None:
    """In the scope of the answer (the free CPUs sharing a NUMA node and an L3 group with it): an even part never
    gets a half core while whole free cores there add up to the request, and no fresh core is split while a
    leftover thread there is unused."""
    topology, free = case.topology, case.free
    scope = CPUSet.of(c for c in free if _cells(topology, [c]) <= _cells(topology, chosen))
    fresh = _fresh_cores(topology, scope)
    sums = {0}
    for core in fresh:
        sums |= {s + len(core) for s in sums}
    if case.count in sums:
        assert _whole(topology, free, chosen) == case.count, f"{chosen}: not whole cores, though {scope} has them"
    split = [core for core in fresh if core & chosen and not core.issubset(chosen)]
    leftover = scope - CPUSet.union_all(fresh) - chosen
    assert not (split and leftover), f"{chosen} splits {split[0]} while leftover thread(s) {leftover} are free"


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    taken=st.sets(st.integers(0, 255), max_size=200),
    count=st.integers(1, 96),
    layout=st.sampled_from(["many-small-l3", "l3-over-nodes", "smt4"]),
)
def test_big_machines_keep_whole_cores(taken: set[int], count: int, layout: str) -> None:
    """256 CPUs: the answer has as many whole-core CPUs as the free whole cores can give (by subset sum)."""
    topology = _BIG[layout]
    free = topology.online_cpus - CPUSet.of(taken)
    if count > len(free):
        return
    chosen = choose_cpus(topology, free, count, AllocationPolicy())
    sums = {0}
    for core in _fresh_cores(topology, free):
        sums |= {s + len(core) for s in sums if s + len(core) <= count}
    assert _whole(topology, free, chosen) == max(sums)
    assert len(chosen) == count and chosen.issubset(free)


def _big(threads: int, l3_cores: int, nodes: int, nodes_per_l3: int = 1) -> Topology:
    cores = 256 // threads
    per_node = cores // nodes
    return machine(
        CoreSpec(
            tuple(t * cores + c for t in range(threads)),
            c // per_node,
            (c // per_node) // nodes_per_l3 if nodes_per_l3 > 1 else c // l3_cores,
        )
        for c in range(cores)
    )


_BIG = {
    "many-small-l3": _big(threads=2, l3_cores=4, nodes=4),
    "l3-over-nodes": _big(threads=2, l3_cores=0, nodes=8, nodes_per_l3=4),
    "smt4": _big(threads=4, l3_cores=8, nodes=2),
}
