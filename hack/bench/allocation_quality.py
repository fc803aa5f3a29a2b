#!/usr/bin/env python3
"""Allocation quality on a random churn trace, for each multi-NUMA fixture topology.

Claims of random sizes arrive and leave on each NUMA device; for every placement it counts whether the allocator
gave whole cores when the free CPUs allowed it (goal 100%), one L3 group when one group had room (goal >= 95%),
and rejections while the device had enough free CPUs (goal 0). Run with .venv/bin/python.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from dra_cpu.core.allocator import AllocationError, AllocationPolicy, choose_cpus
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import DeviceConfig, DeviceType, build_devices
from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ("dual-socket-smt2", "snc-4numa", "multi-l3-per-node", "big-8numa", "cxl-memoryless")


def whole_core_feasible(topo: Topology, free: CPUSet, count: int) -> bool:
    full = [c for c in topo.cores(free) if c == topo.cpu(c.first()).thread_siblings]
    width = topo.threads_per_core
    return sum(len(c) for c in full) >= count - count % width


def split_cores(topo: Topology, free: CPUSet, chosen: CPUSet) -> int:
    """Whole free cores the placement broke, beyond the one an odd request must break."""
    return sum(1 for c in topo.cores(free) if c == topo.cpu(c.first()).thread_siblings and 0 < len(c & chosen) < len(c))


def run(fixture: str, steps: int, seed: int) -> dict[str, float]:
    topo = read_topology(ROOT / "tests/fixtures/sysfs" / fixture)
    devices = [d for d in build_devices(topo, DeviceConfig(node_name="n")) if d.type is DeviceType.CPU]
    rng = random.Random(seed)
    held: dict[str, list[CPUSet]] = {d.name: [] for d in devices}
    placements = whole_ok = whole_feasible = l3_ok = l3_feasible = rejected_with_room = 0
    for _ in range(steps):
        device = rng.choice(devices)
        claims = held[device.name]
        if claims and rng.random() < 0.45:
            claims.pop(rng.randrange(len(claims)))
            continue
        free = device.cpus - CPUSet.union_all(claims)
        count = rng.choice([1, 2, 2, 3, 4, 4, 6, 8])
        if count > len(free):
            continue
        try:
            chosen = choose_cpus(topo, free, count, AllocationPolicy())
        except AllocationError:
            rejected_with_room += 1
            continue
        placements += 1
        if whole_core_feasible(topo, free, count):
            whole_feasible += 1
            whole_ok += split_cores(topo, free, chosen) <= count % topo.threads_per_core
        if any(len(g) >= count for g in topo.l3_groups(free).values()):
            l3_feasible += 1
            l3_ok += len(topo.l3_groups(chosen)) == 1
        claims.append(chosen)
    return {
        "placements": placements,
        "whole": 100.0 * whole_ok / max(1, whole_feasible),
        "l3": 100.0 * l3_ok / max(1, l3_feasible),
        "rejected": rejected_with_room,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    ok = True
    print(f"{'fixture':<20} {'placements':>10} {'whole cores':>12} {'single L3':>10} {'rejected w/ room':>17}")
    for fixture in FIXTURES:
        r = run(fixture, args.steps, args.seed)
        good = r["whole"] == 100.0 and r["l3"] >= 95.0 and r["rejected"] == 0
        ok = ok and good
        print(
            f"{fixture:<20} {r['placements']:>10.0f} {r['whole']:>11.1f}% {r['l3']:>9.1f}% {r['rejected']:>17.0f}"
            f"   {'ok' if good else 'BELOW GOAL'}"
        )
    print("goals: whole cores 100% when feasible, single L3 >= 95% when feasible, 0 rejections with room")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
