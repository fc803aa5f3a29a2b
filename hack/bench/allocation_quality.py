#!/usr/bin/env python3
"""Allocation quality on a random churn trace, per multi-NUMA fixture topology, grouping mode and placement policy.

Claims of random sizes arrive and leave on each CPU device (one per NUMA node, per socket, or the machine's one);
for every placement it counts whether the allocator gave whole cores when the free CPUs allowed it (goal 100%), one
L3 group when one group had room (goal >= 95%), one NUMA node when one node could give whole cores (goal >= 95%,
socket and machine devices), and rejections while the device had room for the request (goal 0). The policies are
those of a claim's CPUConfig: pack (none), wholeCores, alignL3, spread (deliberately over L3 groups and NUMA nodes:
no L3 or NUMA goal) and distributeAcrossNUMA (equal shares per NUMA node of the device, each checked; no L3 or NUMA
goal). Run with .venv/bin/python.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from dra_cpu.core.allocator import AllocationError, AllocationPolicy, choose_cpus
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig, DeviceType, GroupBy, build_devices
from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ("dual-socket-smt2", "snc-4numa", "multi-l3-per-node", "big-8numa", "cxl-memoryless")
POLICIES = {
    "pack": AllocationPolicy(),
    "wholeCores": AllocationPolicy(whole_cores=True),
    "alignL3": AllocationPolicy(align_l3=True),
    "spread": AllocationPolicy(spread=True),
    "distributeAcrossNUMA": AllocationPolicy(distribute_across_numa=True),
}
SIZES = [1, 2, 2, 3, 4, 4, 6, 8]


def full_cores(topo: Topology, free: CPUSet) -> list[CPUSet]:
    return [c for c in topo.cores(free) if c == topo.cpu(c.first()).thread_siblings]


def whole_core_feasible(topo: Topology, free: CPUSet, count: int) -> bool:
    width = topo.threads_per_core
    return sum(len(c) for c in full_cores(topo, free)) >= count - count % width


def split_cores(topo: Topology, free: CPUSet, chosen: CPUSet) -> int:
    """Whole free cores the placement broke, beyond the one an odd request must break."""
    return sum(1 for c in full_cores(topo, free) if 0 < len(c & chosen) < len(c))


def by_node(topo: Topology, cpus: CPUSet) -> list[CPUSet]:
    return [n.cpus & cpus for n in topo.numa_nodes if n.cpus & cpus]


def run(fixture: str, group_by: GroupBy, policy_name: str, steps: int, seed: int) -> dict[str, float]:
    topo = read_topology(ROOT / "tests/fixtures/sysfs" / fixture)
    config = DeviceConfig(node_name="n", group_by=group_by)
    devices = [d for d in build_devices(topo, config) if d.type is DeviceType.CPU]
    policy = POLICIES[policy_name]
    width = topo.threads_per_core
    rng = random.Random(seed)
    held: dict[str, list[CPUSet]] = {d.name: [] for d in devices}
    placements = whole_ok = whole_feasible = l3_ok = l3_feasible = numa_ok = numa_feasible = rejected_with_room = 0
    for _ in range(steps):
        device = rng.choice(devices)
        claims = held[device.name]
        if claims and rng.random() < 0.45:
            claims.pop(rng.randrange(len(claims)))
            continue
        free = device.cpus - CPUSet.union_all(claims)
        count = rng.choice(SIZES)
        nodes = by_node(topo, device.cpus)
        if policy.whole_cores:
            count = max(width, count - count % width)
        if policy.distribute_across_numa:
            count *= len(nodes)
        if count > len(free):
            continue
        # Whether the device had room for this request under the policy: a rejection then is a needless one.
        room = True
        if policy.whole_cores:
            room = sum(len(c) for c in full_cores(topo, free)) >= count
        if policy.align_l3:
            room = any(len(g) >= count for g in topo.l3_groups(free).values())
        if policy.distribute_across_numa:
            room = all(len(n & free) >= count // len(nodes) for n in nodes)
        try:
            chosen = choose_cpus(topo, free, count, policy, device.cpus)
        except AllocationError:
            rejected_with_room += room
            continue
        placements += 1
        if policy.distribute_across_numa:
            share = count // len(nodes)
            assert [len(n & chosen) for n in nodes] == [share] * len(nodes), "equal shares"
            if all(whole_core_feasible(topo, n & free, share) for n in nodes):
                whole_feasible += 1
                whole_ok += all(split_cores(topo, n & free, n & chosen) <= share % width for n in nodes)
        elif whole_core_feasible(topo, free, count):
            whole_feasible += 1
            whole_ok += split_cores(topo, free, chosen) <= count % width
        if not policy.spread and not policy.distribute_across_numa:
            if any(len(g) >= count for g in topo.l3_groups(free).values()):
                l3_feasible += 1
                l3_ok += len(topo.l3_groups(chosen)) == 1
            if any(len(n & free) >= count and whole_core_feasible(topo, n & free, count) for n in nodes):
                numa_feasible += 1
                numa_ok += len(topo.numa_nodes_of(chosen)) == 1
        claims.append(chosen)
    return {
        "placements": placements,
        "whole": 100.0 * whole_ok / max(1, whole_feasible),
        "l3": 100.0 * l3_ok / l3_feasible if l3_feasible else -1.0,
        "numa": 100.0 * numa_ok / numa_feasible if numa_feasible else -1.0,
        "rejected": rejected_with_room,
    }


def percent(value: float) -> str:
    return "-" if value < 0 else f"{value:.1f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fixture", action="append", choices=FIXTURES, help="only these (repeatable)")
    args = parser.parse_args()
    ok = True
    print(
        f"{'fixture':<18} {'groupBy':<9} {'policy':<21} {'placements':>10} {'whole cores':>11} {'single L3':>9} "
        f"{'one NUMA':>8} {'rejected w/ room':>16}"
    )
    for fixture in args.fixture or FIXTURES:
        for group_by in GroupBy:
            for policy_name in POLICIES:
                r = run(fixture, group_by, policy_name, args.steps, args.seed)
                good = (
                    r["whole"] == 100.0
                    and (r["l3"] < 0 or r["l3"] >= 95.0)
                    and (r["numa"] < 0 or r["numa"] >= 95.0)
                    and r["rejected"] == 0
                )
                ok = ok and good
                print(
                    f"{fixture:<18} {group_by.value:<9} {policy_name:<21} {r['placements']:>10.0f} "
                    f"{percent(r['whole']):>11} {percent(r['l3']):>9} {percent(r['numa']):>8} {r['rejected']:>16.0f}"
                    f"   {'ok' if good else 'BELOW GOAL'}"
                )
    print(
        "goals: whole cores 100% when feasible, single L3 >= 95% when feasible, one NUMA node >= 95% when one node "
        "can give whole cores, 0 rejections with room ('-': not a goal of the policy, or never feasible)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
