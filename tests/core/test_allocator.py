from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dra_cpu.core.allocator import AllocationError, AllocationPolicy, choose_cpus
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology
from tests.support.paths import SYSFS

FIXTURES = SYSFS
MULTI_L3 = read_topology(FIXTURES / "multi-l3-per-node")  # node 0: L3 0 = 0-7, L3 1 = 8-15; siblings (2k, 2k+1)
DUAL = read_topology(FIXTURES / "dual-socket-smt2")
BIG = read_topology(FIXTURES / "big-8numa")
PACK = AllocationPolicy()


def pick(topo: Topology, free: str, count: int, policy: AllocationPolicy = PACK) -> str:
    return str(choose_cpus(topo, CPUSet.parse(free), count, policy))


def test_whole_cores_first() -> None:
    assert pick(DUAL, "0-7", 4) == "0-3"
    # CPU 0 is taken by another claim: its sibling 1 is the leftover used for an odd request, cores 2-3,4-5 stay whole.
    assert pick(DUAL, "1-7", 3) == "1-3"
    assert pick(DUAL, "1-7", 2) == "2-3"


def test_single_l3_best_fit() -> None:
    # L3 group 0 has 2 free CPUs, group 1 has 8: a 2-CPU request goes to the tight group and keeps group 1 whole.
    assert pick(MULTI_L3, "6-15", 2) == "6-7"
    # 4 CPUs fit only group 1.
    assert pick(MULTI_L3, "6-15", 4) == "8-11"


def test_fewest_l3_groups_when_no_group_fits() -> None:
    assert pick(MULTI_L3, "0-15", 12) == "0-11"
    assert len(MULTI_L3.l3_groups(CPUSet.parse(pick(MULTI_L3, "2-15", 10)))) == 2


def test_align_l3_is_strict() -> None:
    with pytest.raises(AllocationError, match="alignL3: no single L3 group has 10 free CPUs"):
        choose_cpus(MULTI_L3, CPUSet.parse("0-15"), 10, AllocationPolicy(align_l3=True))


def test_spread_deals_cores_over_l3_groups() -> None:
    got = CPUSet.parse(pick(MULTI_L3, "0-15", 4, AllocationPolicy(spread=True)))
    assert str(got) == "0-1,8-9"
    assert len(MULTI_L3.l3_groups(got)) == 2


def test_whole_cores_policy() -> None:
    whole = AllocationPolicy(whole_cores=True)
    assert pick(DUAL, "1-7", 4, whole) == "2-5"
    with pytest.raises(AllocationError, match="3 CPUs is not a whole number of cores"):
        choose_cpus(DUAL, CPUSet.parse("0-7"), 3, whole)
    with pytest.raises(AllocationError, match="only 4 CPUs form whole free cores"):
        choose_cpus(DUAL, CPUSet.parse("1,3-7"), 6, whole)


def test_too_many() -> None:
    with pytest.raises(AllocationError, match="9 CPUs requested but only 8 are free"):
        choose_cpus(DUAL, CPUSet.parse("0-7"), 9, PACK)


@settings(max_examples=200, deadline=None)
@given(
    free=st.sets(st.integers(min_value=0, max_value=63), min_size=1),
    count=st.integers(min_value=1, max_value=64),
    spread=st.booleans(),
)
def test_properties(free: set[int], count: int, spread: bool) -> None:
    available = CPUSet.of(free)
    policy = AllocationPolicy(spread=spread)
    if count > len(available):
        with pytest.raises(AllocationError):
            choose_cpus(BIG, available, count, policy)
        return
    got = choose_cpus(BIG, available, count, policy)
    assert len(got) == count
    assert got.issubset(available)
    assert got == choose_cpus(BIG, available, count, policy), "deterministic"
    if not spread:
        whole_free = [c for c in BIG.cores(available) if c == BIG.cpu(c.first()).thread_siblings]
        # When whole free cores can cover the request, at most the odd CPU splits a core it did not split before.
        if sum(len(c) for c in whole_free) >= count:
            newly_split = [w for w in whole_free if (w & got) and (w & got) != w]
            assert len(newly_split) <= count % 2
        groups = BIG.l3_groups(available)
        if any(len(g) >= count for g in groups.values()):
            assert len(BIG.l3_groups(got)) == 1, "a request that fits one L3 group stays in one"
