from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dra_cpu.core.allocator import AllocationError, AllocationPolicy, choose_cpus
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology
from tests.core.machines import CoreSpec, machine, regular
from tests.harness.paths import SYSFS

FIXTURES = SYSFS
MULTI_L3 = read_topology(FIXTURES / "multi-l3-per-node")  # node 0: L3 0 = 0-7, L3 1 = 8-15; siblings (2k, 2k+1)
DUAL = read_topology(FIXTURES / "dual-socket-smt2")  # nodes 0-7 and 8-15; siblings (2k, 2k+1)
BIG = read_topology(FIXTURES / "big-8numa")
SNC = read_topology(FIXTURES / "snc-4numa")  # 4 nodes (and L3 groups) of 4 CPUs; siblings (2k, 2k+1)
# 3 NUMA nodes of two SMT-4 cores under one L3 group: core c is CPUs c, c+6, c+12, c+18; node n has cores 2n, 2n+1.
SMT4_ONE_L3 = regular(nodes=3, cores_per_node=2, threads=4, nodes_per_l3=3)
# CPU 3 is offline: core 0 is CPU 0 alone, cores 1 and 2 are CPUs 1,4 and 2,5.
OFFLINE_SIBLING = regular(nodes=1, cores_per_node=3, threads=2, offline=[3])
PACK = AllocationPolicy()


def pick(topo: Topology, free: str, count: int, policy: AllocationPolicy = PACK, device: str | None = None) -> str:
    return str(choose_cpus(topo, CPUSet.parse(free), count, policy, None if device is None else CPUSet.parse(device)))


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
    # CPU 0 is taken, so its sibling 1 is a split core: the odd CPU of a 5-CPU claim comes from there, and whole
    # cores are dealt over both groups (2-3, 8-9 ... not one core of each group and then a split one).
    assert pick(MULTI_L3, "1-15", 5, AllocationPolicy(spread=True)) == "1-3,8-9"
    assert pick(MULTI_L3, "1-15", 4, AllocationPolicy(spread=True)) == "2-3,8-9"


def test_whole_cores_policy() -> None:
    whole = AllocationPolicy(whole_cores=True)
    assert pick(DUAL, "1-7", 4, whole) == "2-5"
    with pytest.raises(AllocationError, match="3 CPUs is not a whole number of cores"):
        choose_cpus(DUAL, CPUSet.parse("0-7"), 3, whole)
    with pytest.raises(AllocationError, match="only 4 CPUs form whole free cores"):
        choose_cpus(DUAL, CPUSet.parse("1,3-7"), 6, whole)


def test_socket_device_stays_on_one_numa_node() -> None:
    """big-8numa: socket 0 is NUMA nodes 0 (CPUs 0-7) and 1 (8-15) under one L3; siblings (2k, 2k+1)."""
    assert pick(BIG, "0-15", 4) == "0-3"
    # Node 0 has 4 free CPUs, node 1 has 8: 6 CPUs go to node 1 rather than 4-9 across both (what one L3 alone gives).
    assert pick(BIG, "4-15", 6) == "8-13"
    # Both nodes fit: the tighter one (6 free) takes it, node 1 stays whole for a bigger claim.
    assert pick(BIG, "2-15", 4) == "2-5"
    # An odd request goes where a split core already is: CPU 1's sibling is taken, so node 0 gives 1-3.
    assert pick(BIG, "1-15", 3) == "1-3"


def test_machine_device_prefers_one_numa_node_then_one_l3() -> None:
    # All nodes fit: the tightest (node 3, 4 free) and its L3.
    assert pick(BIG, "0-27,32-63", 4) == "24-27"
    # No node has 12 free: one L3 group (socket 0), whole cores, as few NUMA nodes as that L3 allows.
    assert pick(BIG, "0-63", 12) == "0-11"
    # alignL3 may cross NUMA nodes inside one L3 group, never L3 groups.
    assert pick(BIG, "0-15", 10, AllocationPolicy(align_l3=True)) == "0-9"
    with pytest.raises(AllocationError, match="alignL3: no single L3 group has 20 free CPUs"):
        choose_cpus(BIG, CPUSet.parse("0-63"), 20, AllocationPolicy(align_l3=True))


def test_whole_cores_across_numa_nodes_when_no_node_has_them() -> None:
    # Node 0 has one whole core (0-1) and two split ones, node 1 one whole core (8-9) and a split one.
    whole = AllocationPolicy(whole_cores=True)
    assert pick(BIG, "0-1,3,5,8-9,11", 4, whole) == "0-1,8-9"


def test_distribute_across_numa() -> None:
    spread_numa = AllocationPolicy(distribute_across_numa=True)
    # Socket 0 (NUMA nodes 0 and 1): 3 CPUs on each, each share packed as usual.
    assert pick(BIG, "0-15", 6, spread_numa, device="0-15") == "0-2,8-10"
    # The machine: 2 CPUs (one whole core) on each of the 8 nodes.
    got = CPUSet.parse(pick(BIG, "0-63", 16, spread_numa, device="0-63"))
    assert got == CPUSet.parse("0-1,8-9,16-17,24-25,32-33,40-41,48-49,56-57")
    # Busy CPUs: each share still takes whole free cores (CPU 1's sibling 0 is taken: 2-3, not 1-2).
    assert pick(BIG, "1-15", 4, spread_numa, device="0-15") == "2-3,8-9"
    whole = AllocationPolicy(distribute_across_numa=True, whole_cores=True)
    assert pick(BIG, "0-15", 8, whole, device="0-15") == "0-3,8-11"
    # A one-node device: the whole claim on that node.
    assert pick(BIG, "8-15", 3, spread_numa, device="8-15") == "8-10"


@pytest.mark.parametrize(
    ("free", "count", "policy", "message"),
    [
        (
            "0-63",
            12,
            AllocationPolicy(distribute_across_numa=True),
            "12 CPUs do not divide into equal shares over the device's 8 NUMA nodes (0-7)",
        ),
        (
            "8-15",
            4,
            AllocationPolicy(distribute_across_numa=True),
            "NUMA node 0 has 0 free CPU(s) (none), its share is 2",
        ),
        (
            "0-15",
            6,
            AllocationPolicy(distribute_across_numa=True, whole_cores=True),
            "NUMA node 0, share of 3: wholeCores: 3 CPUs is not a whole number of cores",
        ),
    ],
    ids=["does-not-divide", "node-full", "odd-whole-core-share"],
)
def test_distribute_across_numa_refusals(free: str, count: int, policy: AllocationPolicy, message: str) -> None:
    device = "0-63" if count == 12 else "0-15"
    with pytest.raises(AllocationError, match=f"^distributeAcrossNUMA: {re.escape(message)}"):
        choose_cpus(BIG, CPUSet.parse(free), count, policy, CPUSet.parse(device))


def _taken(topo: Topology, cpus: str, device: str | None = None) -> str:
    """The free CPUs of a device (default: the machine) when `cpus` are taken."""
    pool = topo.online_cpus if device is None else CPUSet.parse(device)
    return str(pool - CPUSet.parse(cpus))


@pytest.mark.parametrize(
    ("topo", "free", "count", "policy", "expected"),
    [
        # D1: an even claim takes whole free cores, not the leftover threads of cores other claims half hold.
        (SNC, _taken(SNC, "0-3,12,14"), 2, PACK, "4-5"),
        (DUAL, _taken(DUAL, "1,5,10,11"), 6, PACK, "8-9,12-15"),
        # D2: the odd CPU stays in the NUMA nodes and L3 groups of the whole cores (2 nodes, not 3).
        (SNC, _taken(SNC, "0-1"), 7, PACK, "4-10"),
        # D3: one L3 over three NUMA nodes: the fewest NUMA nodes still count (cores 0, 4, 5: nodes 0 and 2).
        (SMT4_ONE_L3, _taken(SMT4_ONE_L3, "1,7,13,19,3,9,15,21"), 12, PACK, "0,4-6,10-12,16-18,22-23"),
        # D4: one CPU comes from a leftover thread (12, whose sibling 13 is taken), not from splitting a fresh core.
        (MULTI_L3, _taken(MULTI_L3, "4,5,13", device="0-15"), 1, PACK, "12"),
        # D5: cores of mixed width (CPU 0's sibling is offline): whole cores that add up, not CPU 0 and a split.
        (OFFLINE_SIBLING, "0-2,4-5", 4, AllocationPolicy(whole_cores=True), "1-2,4-5"),
        (OFFLINE_SIBLING, "0-2,4-5", 4, PACK, "1-2,4-5"),
        (OFFLINE_SIBLING, "0-2,4-5", 3, PACK, "0-1,4"),
    ],
    ids=["D1-snc", "D1-dual", "D2", "D3", "D4", "D5-wholeCores", "D5-pack-even", "D5-pack-odd"],
)
def test_placement_rule(topo: Topology, free: str, count: int, policy: AllocationPolicy, expected: str) -> None:
    """The cases of issue 22, each once answered worse than the kubelet's static policy does."""
    assert pick(topo, free, count, policy) == expected


def test_hybrid_cores_count_by_their_width() -> None:
    """Two 2-thread performance cores and two 1-thread efficiency cores: 3 CPUs are one of each, whole."""
    hybrid = machine(
        [
            CoreSpec((0, 1), 0, 0, core_type="performance"),
            CoreSpec((2, 3), 0, 0, core_type="performance"),
            CoreSpec((4,), 0, 0, core_type="efficiency"),
            CoreSpec((5,), 0, 0, core_type="efficiency"),
        ]
    )
    assert pick(hybrid, "0-5", 3) == "0-1,4"
    assert pick(hybrid, "0-5", 3, AllocationPolicy(whole_cores=True)) == "0-1,4"
    # CPUs 0 and 4 are taken: core 0-1 is a leftover, the whole cores are 2-3 and 5.
    assert pick(hybrid, "1-3,5", 3, AllocationPolicy(whole_cores=True)) == "2-3,5"


def test_whole_cores_that_cannot_add_up() -> None:
    smt4_and_smt2 = machine([CoreSpec((0, 1, 2, 3), 0, 0), CoreSpec((4, 5), 0, 0)])
    message = r"wholeCores: no whole free cores add up to exactly 5 CPUs \(free whole cores by width: 1 of 2 threads"
    with pytest.raises(AllocationError, match=message):
        choose_cpus(smt4_and_smt2, CPUSet.parse("0-5"), 5, AllocationPolicy(whole_cores=True))
    assert pick(smt4_and_smt2, "0-5", 5) == "0-4"


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
    whole_free = [c for c in BIG.cores(available) if c == BIG.cpu(c.first()).thread_siblings]
    # When whole free cores can cover the request, at most the odd CPU splits a core it did not split before.
    if sum(len(c) for c in whole_free) >= count:
        newly_split = [w for w in whole_free if (w & got) and (w & got) != w]
        assert len(newly_split) <= count % 2
    if not spread:
        # Whole cores come before L3 locality: only a request one L3 group can give as whole cores must stay there.
        groups = BIG.l3_groups(available)
        if count % 2 == 0 and any(_whole_cores_in(g) >= count for g in groups.values()):
            assert len(BIG.l3_groups(got)) == 1, "a request one L3 group can give as whole cores stays in one"
        nodes = [available & node.cpus for node in BIG.numa_nodes]
        if count % 2 == 0 and any(_whole_cores_in(n) >= count for n in nodes):
            assert len(BIG.numa_nodes_of(got)) == 1, "a request one NUMA node can give as whole cores stays there"


def _whole_cores_in(cpus: CPUSet) -> int:
    return sum(len(c) for c in BIG.cores(cpus) if c == BIG.cpu(c.first()).thread_siblings)


@settings(max_examples=100, deadline=None)
@given(free=st.sets(st.integers(min_value=0, max_value=63), min_size=1), share=st.integers(min_value=1, max_value=8))
def test_distribute_properties(free: set[int], share: int) -> None:
    """Equal shares on every node of the machine device, or a refusal that names the node without room."""
    available = CPUSet.of(free)
    policy = AllocationPolicy(distribute_across_numa=True)
    short = [n.id for n in BIG.numa_nodes if len(available & n.cpus) < share]
    if 8 * share > len(available) or short:
        with pytest.raises(AllocationError):
            choose_cpus(BIG, available, 8 * share, policy, BIG.online_cpus)
        return
    got = choose_cpus(BIG, available, 8 * share, policy, BIG.online_cpus)
    assert got.issubset(available)
    assert [len(got & n.cpus) for n in BIG.numa_nodes] == [share] * 8
