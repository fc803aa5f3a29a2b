#!/usr/bin/env python3
"""CPU choice: dra-cpu's placement rule against the kubelet's own CPU manager, on the same seeded churn traces.

    .venv/bin/python hack/bench/cpu_choice.py [--allocations N] [--seed S] [--topology NAME ...] [--quick]
                                              [--no-kubelet] [--json FILE]

For every topology (each sysfs capture in tests/fixtures/sysfs, and synthetic machines: mixed core widths, a hybrid
part, SMT-4, one L3 over several NUMA nodes, many small L3 groups, 256 CPUs) and mode (`node`: claims on a
machine-wide device; `numa`: claims on one NUMA node's device, as with the default groupBy), a seeded trace of
claims of mixed sizes arrives and leaves (at least --allocations placements, 2000 by default) and is replayed by:

  dra-cpu          core/allocator.choose_cpus, the default policy;
  kubelet          the static CPU manager policy of k8s.io/kubernetes v1.37.2 (pkg/kubelet/cm/cpumanager), default
                   options; a claim on a NUMA node reaches it as the topology manager's hint for that node;
  kubelet-uncore   the same with prefer-align-cpus-by-uncorecache;
  kubelet-tm       the same with the topology manager's single-numa-node policy (node mode only);

and, in a second table, by dra-cpu's policy variations (wholeCores, alignL3, spread, distributeAcrossNUMA) on traces
shaped for them. Per topology, mode and chooser it prints, over all placements:

  placed; rejected (needless: the chooser's own rule had room); conflicts (answers with a CPU another claim holds:
  not scored, and held as the chooser's own state has them); whole% (as many CPUs as whole free cores as the
  device's free cores could give, among claims where that is at least one core); 1-NUMA% (on one NUMA node, among
  claims one node could hold with as many whole cores; node mode); any-room% (on one NUMA node, among claims one
  node had room for, whole cores or not: what the topology manager keeps, see docs/design.md on this trade-off);
  1-L3% (in one L3 group, among claims one L3 group of one node could hold with as many whole cores); split
  (fresh cores split per 100 claims); nodes and L3s (touched per claim); block (the most CPUs of whole free cores
  on one NUMA node after the trace); and the thread CPU time per choice, p50 and p99 in microseconds (Python for
  dra-cpu, Go for the kubelet), beside a floor measured in the same run: one pass of Topology.cores() over the
  device's free CPUs (what any choice costs at least, in Python).

Goals, checked per topology and mode: dra-cpu's whole% >= the kubelet's and kubelet-uncore's; its 1-NUMA% and 1-L3%
>= every kubelet variant's; no needless rejection and no conflict; p99 <= 1 ms. Exit status 1 when one is missed.

The kubelet side is the Go program hack/bench/kubelet-cpu-assignment, built against the test kubelet's module by
`hack/testenv/kubernetes.sh install` (CI's hack/install-testenv.sh runs it); without it (or with --no-kubelet) only
dra-cpu's rows are printed. --quick: 300 placements per trace (a smoke test, ~30 s). --json FILE: every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dra_cpu.core.allocator import AllocationError, AllocationPolicy, choose_cpus  # noqa: E402
from dra_cpu.core.cpuset import CPUSet  # noqa: E402
from dra_cpu.core.topology import Topology  # noqa: E402
from dra_cpu.node.sysfs import read_topology  # noqa: E402
from tests.core.machines import CoreSpec, machine, regular  # noqa: E402

SYSFS = ROOT / "tests/fixtures/sysfs"
KUBELET_VARIANTS: list[dict[str, Any]] = [
    {"name": "kubelet", "options": {}},
    {"name": "kubelet-uncore", "options": {"prefer-align-cpus-by-uncorecache": "true"}},
    {"name": "kubelet-tm", "options": {}, "topologyManager": "single-numa-node"},
]
POLICIES = {
    "wholeCores": AllocationPolicy(whole_cores=True),
    "alignL3": AllocationPolicy(align_l3=True),
    "spread": AllocationPolicy(spread=True),
    "distributeAcrossNUMA": AllocationPolicy(distribute_across_numa=True),
}
SMALL_SIZES = [1, 1, 2, 2, 2, 3, 3, 4, 4, 5, 6, 8]
P99_GOAL_US = 1000.0


def synthetic() -> dict[str, Topology]:
    hybrid = [CoreSpec((2 * i, 2 * i + 1), 0, 0, core_type="performance") for i in range(8)]
    hybrid += [CoreSpec((16 + i,), 0, 0, core_type="efficiency") for i in range(16)]
    return {
        "mixed-width-offline": regular(2, 8, 2, offline=[17, 19, 28]),
        "hybrid-8p16e": machine(hybrid),
        "smt4-l3-over-3-nodes": regular(3, 4, 4, nodes_per_l3=3),
        "many-small-l3-256": regular(4, 32, 2, l3_per_node=8, nodes_per_socket=2),
        "l3-over-4-nodes-256": regular(8, 16, 2, nodes_per_l3=4, nodes_per_socket=4),
        "smt4-256": regular(2, 32, 4, l3_per_node=4),
    }


def topologies(names: Sequence[str] | None) -> dict[str, Topology]:
    found = {d.name: read_topology(d) for d in sorted(SYSFS.iterdir()) if d.is_dir()}
    found.update(synthetic())
    unknown = set(names or ()) - set(found)
    if unknown:
        raise SystemExit(f"unknown topology {', '.join(sorted(unknown))} (known: {', '.join(found)})")
    return {n: t for n, t in found.items() if not names or n in names}


def cpu_nodes(topo: Topology) -> dict[int, CPUSet]:
    """NUMA node -> its online CPUs (nodes with CPUs only)."""
    return {n.id: n.cpus & topo.online_cpus for n in topo.numa_nodes if n.cpus & topo.online_cpus}


# --- traces -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    op: str  # "alloc" | "free"
    id: int
    cpus: int = 0
    node: int = -1  # the NUMA node of a claim on a node's device; -1: the machine's device


def trace(topo: Topology, mode: str, allocations: int, seed: int, shape: Callable[[int], int] = int) -> list[Op]:
    """Claims arrive and leave at random (a claim present leaves with probability 0.45 at each step); sizes are
    mostly small, one in eight is half a NUMA node to one and a half (node mode) or to a whole node (numa mode),
    `shape`d by the policy; a claim that does not fit the free CPUs of its device is not sent (the scheduler would
    not send it)."""
    rng = random.Random(f"{seed}/{mode}")
    nodes = cpu_nodes(topo)
    per_node = min(len(c) for c in nodes.values())
    free = {n: len(c) for n, c in nodes.items()} if mode == "numa" else {-1: len(topo.online_cpus)}
    held: dict[int, tuple[int, int]] = {}
    ops: list[Op] = []
    next_id = placed = 0
    while placed < allocations:
        if held and rng.random() < 0.45:
            claim = rng.choice(sorted(held))
            node, count = held.pop(claim)
            free[node] += count
            ops.append(Op("free", claim))
            continue
        big = max(1, per_node * 3 // 2 if mode == "node" else per_node)
        size = rng.choice(SMALL_SIZES) if rng.random() < 0.875 else rng.randint(max(1, per_node // 2), big)
        count = shape(size)
        node = rng.choice(sorted(free)) if mode == "numa" else -1
        if count > free[node] or count <= 0:
            continue
        next_id += 1
        placed += 1
        held[next_id] = (node, count)
        free[node] -= count
        ops.append(Op("alloc", next_id, count, node))
    return ops


# --- what a placement was worth -----------------------------------------------------------------------------------


@dataclass
class Rate:
    """How many of the claims a goal applies to (`of`) met it (`ok`)."""

    ok: int = 0
    of: int = 0

    def count(self, met: bool) -> None:
        self.of += 1
        self.ok += met

    def percent(self) -> float | None:
        return round(100.0 * self.ok / self.of, 1) if self.of else None


@dataclass
class Figures:
    """A chooser's figures over a trace. Counts: placed, rejected, needless, conflicts; sums over the placements:
    split (fresh cores split), nodes, l3s (touched); block (after the trace). Rates: whole, oneNuma, oneNumaAny,
    oneL3."""

    counts: Counter[str] = field(default_factory=Counter)
    rates: dict[str, Rate] = field(
        default_factory=lambda: {"whole": Rate(), "oneNuma": Rate(), "oneNumaAny": Rate(), "oneL3": Rate()}
    )
    ns: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | None]:
        placed = self.counts["placed"]

        def per(key: str, scale: float = 1.0, digits: int = 2) -> float | None:
            return round(scale * self.counts[key] / placed, digits) if placed else None

        times = sorted(self.ns)
        return {
            **{key: self.counts[key] for key in ("placed", "rejected", "needless", "conflicts")},
            **{key: rate.percent() for key, rate in self.rates.items()},
            "splitPer100": per("split", 100.0, 1),
            "nodes": per("nodes"),
            "l3s": per("l3s"),
            "block": self.counts["block"],
            "p50us": round(times[len(times) // 2] / 1000, 1) if times else None,
            "p99us": round(times[min(len(times) - 1, len(times) * 99 // 100)] / 1000, 1) if times else None,
        }


class Judge:
    """Scores placements on one topology; every chooser is scored by the same code."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.nodes = cpu_nodes(topo)
        self.cells = {}
        for node, cpus in self.nodes.items():
            for l3, group in topo.l3_groups(cpus).items():
                self.cells[(node, l3)] = group

    def fresh(self, free: CPUSet) -> list[CPUSet]:
        return [c for c in self.topo.cores(free) if c == self.topo.cpu(c.first()).thread_siblings]

    def best_whole(self, fresh: Iterable[CPUSet], count: int) -> int:
        sums = 1
        for core in fresh:
            sums |= (sums << len(core)) & ((1 << (count + 1)) - 1)
        return sums.bit_length() - 1

    def score(self, figures: Figures, scope: CPUSet, count: int, chosen: CPUSet, mode: str, basis: str) -> None:
        """One placement of `count` CPUs out of `scope` (the device's free CPUs then). Whole cores are judged
        against what the device could give (`basis` "device"), each NUMA node's share ("shares":
        distributeAcrossNUMA) or one L3 group ("l3": alignL3)."""
        topo = self.topo
        fresh = self.fresh(scope)
        best = self.best_whole(fresh, count)
        if basis == "shares":
            parts = [(scope & cpus, len(chosen & cpus)) for cpus in self.nodes.values() if chosen & cpus]
            bests = [self.best_whole(self.fresh(part), n) for part, n in parts]
            wholes = [self.whole(part, chosen) for part, _ in parts]
        else:
            groups = [g for g in topo.l3_groups(scope).values() if len(g) >= count] if basis == "l3" else [scope]
            bests = [max(self.best_whole(self.fresh(g), count) for g in groups)]
            wholes = [self.whole(scope, chosen)]
        figures.counts["placed"] += 1
        if any(bests):
            figures.rates["whole"].count(wholes == bests)
        if mode == "node" and any(self._holds(scope & cpus, fresh, count, best) for cpus in self.nodes.values()):
            figures.rates["oneNuma"].count(len(topo.numa_nodes_of(chosen)) == 1)
        if mode == "node" and any(len(scope & cpus) >= count for cpus in self.nodes.values()):
            figures.rates["oneNumaAny"].count(len(topo.numa_nodes_of(chosen)) == 1)
        if any(self._holds(scope & cpus, fresh, count, best) for cpus in self.cells.values()):
            figures.rates["oneL3"].count(len(topo.l3_groups(chosen)) == 1)
        figures.counts["split"] += sum(1 for c in fresh if c & chosen and not c.issubset(chosen))
        figures.counts["nodes"] += len(topo.numa_nodes_of(chosen))
        figures.counts["l3s"] += len(topo.l3_groups(chosen))

    def whole(self, scope: CPUSet, chosen: CPUSet) -> int:
        """CPUs of `chosen` that are whole free cores of `scope`."""
        return sum(len(c) for c in self.fresh(scope) if c.issubset(chosen))

    def _holds(self, part: CPUSet, fresh: list[CPUSet], count: int, best: int) -> bool:
        """Whether `part` of the free CPUs takes the claim with as many whole-core CPUs as the whole device."""
        return len(part) >= count and self.best_whole((c for c in fresh if c.issubset(part)), count) == best

    def finish(self, figures: Figures, free: CPUSet) -> None:
        figures.counts["block"] = max(
            (sum(len(c) for c in self.fresh(free & cpus)) for cpus in self.nodes.values()), default=0
        )


def device_cpus(topo: Topology, node: int) -> CPUSet:
    return topo.online_cpus if node < 0 else cpu_nodes(topo)[node]


# A chooser: (alloc op, device CPUs, free CPUs of the device) -> the CPUs (None: rejected) and the thread CPU time
# the choice took, in ns. A room rule: whether the chooser's own rule had room for a claim it rejected.
Chooser = Callable[[Op, CPUSet, CPUSet], tuple[CPUSet | None, int]]
Room = Callable[[Op, CPUSet, CPUSet], bool]


def replay(topo: Topology, ops: list[Op], mode: str, choose: Chooser, room: Room, basis: str = "device") -> Figures:
    judge, figures = Judge(topo), Figures()
    held: dict[int, CPUSet] = {}
    for op in ops:
        if op.op == "free":
            held.pop(op.id, None)
            continue
        device = device_cpus(topo, op.node)
        scope = device - CPUSet.union_all(held.values())
        chosen, ns = choose(op, device, scope)
        if chosen is None:
            figures.counts["rejected"] += 1
            figures.counts["needless"] += room(op, device, scope)
            continue
        figures.ns.append(ns)
        held[op.id] = chosen
        if len(chosen) != op.cpus or not chosen.issubset(scope):
            # CPUs another claim holds (or outside the device): the chooser holds them anyway, as its state says.
            figures.counts["conflicts"] += 1
            continue
        judge.score(figures, scope, op.cpus, chosen, mode, basis)
    judge.finish(figures, topo.online_cpus - CPUSet.union_all(held.values()))
    return figures


def dra_cpu(topo: Topology, policy: AllocationPolicy, floor: list[int] | None = None) -> Chooser:
    def choose(op: Op, device: CPUSet, scope: CPUSet) -> tuple[CPUSet | None, int]:
        if floor is not None:
            start = time.thread_time_ns()
            topo.cores(scope)
            floor.append(time.thread_time_ns() - start)
        start = time.thread_time_ns()
        try:
            chosen: CPUSet | None = choose_cpus(topo, scope, op.cpus, policy, device)
        except AllocationError:
            chosen = None
        return chosen, time.thread_time_ns() - start

    return choose


def any_room(op: Op, device: CPUSet, scope: CPUSet) -> bool:
    return len(scope) >= op.cpus


def kubelet(topo: Topology, ops: list[Op], program: str) -> dict[str, Chooser]:
    """Runs the trace through the kubelet's CPU manager (every variant) and returns a chooser per variant that
    hands out its answers in trace order."""
    cpus = [
        {
            "id": c.id,
            "core": min(c.thread_siblings.ids | {c.id}),
            "socket": c.socket or 0,
            "node": c.numa_node or 0,
            "l3": c.l3_cache if c.l3_cache is not None else c.socket or 0,
        }
        for c in topo.cpus
        if c.online
    ]
    variants = [v for v in KUBELET_VARIANTS if "topologyManager" not in v or all(o.node < 0 for o in ops)]
    payload = json.dumps({"cpus": cpus, "variants": variants, "ops": [asdict(o) for o in ops]})
    done = subprocess.run([program], input=payload, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{program} failed ({done.returncode}): {done.stderr.strip()}")
    choosers: dict[str, Chooser] = {}
    for result in json.loads(done.stdout)["results"]:
        answers = iter(result["allocations"])

        def choose(op: Op, device: CPUSet, scope: CPUSet, answers: Any = answers) -> tuple[CPUSet | None, int]:
            answer = next(answers)
            assert answer["id"] == op.id, f"the kubelet answered claim {answer['id']} for claim {op.id}"
            return (None if answer.get("error") else CPUSet.of(answer["cpus"])), answer["ns"]

        choosers[result["name"]] = choose
    return choosers


def single_node_room(topo: Topology) -> Room:
    """The topology manager's single-numa-node policy admits a claim when one NUMA node has room for it."""
    nodes = cpu_nodes(topo)
    return lambda op, device, scope: any(len(scope & cpus) >= op.cpus for cpus in nodes.values())


# --- dra-cpu's policy variations ----------------------------------------------------------------------------------


def variation(topo: Topology, name: str) -> tuple[Callable[[int], int], Room]:
    """How a trace is shaped for a policy (claim sizes it accepts) and when it has room for a claim."""
    judge = Judge(topo)
    width = topo.threads_per_core
    nodes = cpu_nodes(topo)
    if name == "wholeCores":
        return (lambda n: max(width, n - n % width)), (
            lambda op, device, scope: judge.best_whole(judge.fresh(scope), op.cpus) == op.cpus
        )
    if name == "alignL3":
        return int, lambda op, device, scope: any(len(g) >= op.cpus for g in topo.l3_groups(scope).values())
    if name == "distributeAcrossNUMA":
        return (lambda n: n * len(nodes)), (
            lambda op, device, scope: all(len(scope & c) >= op.cpus // len(nodes) for c in nodes.values())
        )
    return int, any_room


# --- report -------------------------------------------------------------------------------------------------------

COLUMNS = [
    ("chooser", 21, "name"),
    ("placed", 6, "placed"),
    ("rej", 4, "rejected"),
    ("needless", 8, "needless"),
    ("conflicts", 9, "conflicts"),
    ("whole%", 6, "whole"),
    ("1-NUMA%", 7, "oneNuma"),
    ("any-room%", 9, "oneNumaAny"),
    ("1-L3%", 6, "oneL3"),
    ("split", 6, "splitPer100"),
    ("nodes", 5, "nodes"),
    ("L3s", 5, "l3s"),
    ("block", 5, "block"),
    ("p50us", 7, "p50us"),
    ("p99us", 7, "p99us"),
]


def row(name: str, summary: dict[str, Any]) -> str:
    values = {**summary, "name": name}
    cells = []
    for title, width, key in COLUMNS:
        value = values[key]
        text = "-" if value is None else str(value)
        cells.append(text.ljust(width) if key == "name" else text.rjust(max(width, len(title))))
    return " ".join(cells)


def header() -> str:
    return " ".join(t.ljust(w) if k == "name" else t.rjust(max(w, len(t))) for t, w, k in COLUMNS)


def goals(results: dict[str, dict[str, Any]]) -> list[str]:
    """The goals dra-cpu misses against the kubelet variants on one topology and mode (empty: all met)."""
    ours = results["dra-cpu"]
    missed = []

    def below(key: str, other: str) -> bool:
        theirs = results[other][key]
        return theirs is not None and (ours[key] is None or ours[key] < theirs)

    for key, others in (
        ("whole", ["kubelet", "kubelet-uncore"]),
        ("oneNuma", [k for k in results if k.startswith("kubelet")]),
        ("oneL3", [k for k in results if k.startswith("kubelet")]),
    ):
        missed += [
            f"{key} {ours[key]} < {other} {results[other][key]}"
            for other in others
            if other in results and below(key, other)
        ]
    if ours["needless"]:
        missed.append(f"{ours['needless']} needless rejection(s)")
    if ours["conflicts"]:
        missed.append(f"{ours['conflicts']} placement(s) with CPUs another claim holds")
    if ours["p99us"] is not None and ours["p99us"] > P99_GOAL_US:
        missed.append(f"p99 {ours['p99us']} us > {P99_GOAL_US:.0f} us")
    return missed


def kubelet_program(wanted: bool) -> str | None:
    if not wanted:
        return None
    found = subprocess.run(
        [str(ROOT / "hack/testenv/kubernetes.sh"), "cpu-assignment"], capture_output=True, text=True, check=False
    )
    if found.returncode:
        print(
            "cpu_choice: the kubelet's side is not built (hack/testenv/kubernetes.sh install builds it); "
            "printing dra-cpu's rows only",
            file=sys.stderr,
        )
        return None
    return found.stdout.strip()


def describe(topo: Topology) -> str:
    widths = sorted({len(c) for c in topo.cores()})
    return (
        f"{len(topo.online_cpus)} CPUs, {len(cpu_nodes(topo))} NUMA node(s), {len(topo.l3_groups())} L3 group(s), "
        f"core widths {'/'.join(map(str, widths))}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocations", type=int, default=2000, help="placements per trace (default 2000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--topology", action="append", help="only these (repeatable)")
    parser.add_argument("--quick", action="store_true", help="300 placements per trace")
    parser.add_argument("--no-kubelet", action="store_true", help="dra-cpu's rows only")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args()
    allocations = 300 if args.quick else args.allocations
    program = kubelet_program(not args.no_kubelet)
    report: dict[str, Any] = {"allocations": allocations, "seed": args.seed, "kubelet": program is not None}
    comparison: dict[str, Any] = {}
    variations: dict[str, Any] = {}
    ok = True
    print(f"CPU choice, {allocations} placements per trace, seed {args.seed}")
    print(header())
    for name, topo in topologies(args.topology).items():
        print(f"{name}: {describe(topo)}")
        modes = ["node", "numa"] if len(cpu_nodes(topo)) > 1 else ["node"]
        for mode in modes:
            ops = trace(topo, mode, allocations, args.seed)
            floor: list[int] = []
            results = {"dra-cpu": replay(topo, ops, mode, dra_cpu(topo, AllocationPolicy(), floor), any_room).summary()}
            if program:
                for variant, chooser in kubelet(topo, ops, program).items():
                    room = single_node_room(topo) if variant == "kubelet-tm" else any_room
                    results[variant] = replay(topo, ops, mode, chooser, room).summary()
            missed = goals(results)
            ok = ok and not missed
            floor_us = round(statistics.median(floor) / 1000, 1) if floor else None
            comparison[f"{name}/{mode}"] = {"choosers": results, "floorUs": floor_us, "missed": missed}
            for who, summary in results.items():
                print(row(f"  {mode} {who}", summary))
            print(
                f"  {mode}: floor {floor_us} us; " + ("goals met" if not missed else "BELOW GOAL: " + "; ".join(missed))
            )
    print("\ndra-cpu's policy variations (their own traces; node mode, numa mode where the machine has several nodes)")
    print(header())
    for name, topo in topologies(args.topology).items():
        for policy_name, policy in POLICIES.items():
            for mode in ["node", "numa"] if len(cpu_nodes(topo)) > 1 else ["node"]:
                if policy_name == "distributeAcrossNUMA" and (mode == "numa" or len(cpu_nodes(topo)) == 1):
                    continue
                shape, room = variation(topo, policy_name)
                ops = trace(topo, mode, allocations, args.seed, shape)
                basis = {"distributeAcrossNUMA": "shares", "alignL3": "l3"}.get(policy_name, "device")
                summary = replay(topo, ops, mode, dra_cpu(topo, policy), room, basis).summary()
                missed = [f"{summary['needless']} needless rejection(s)"] if summary["needless"] else []
                if summary["conflicts"]:
                    missed.append(f"{summary['conflicts']} placement(s) with CPUs another claim holds")
                if summary["whole"] not in (None, 100.0):
                    missed.append(f"whole {summary['whole']}% < 100%")
                if policy_name == "alignL3" and summary["l3s"] not in (None, 1.0):
                    missed.append(f"{summary['l3s']} L3 groups per claim")
                ok = ok and not missed
                variations[f"{name}/{mode}/{policy_name}"] = {**summary, "missed": missed}
                print(
                    row(f"{name} {mode} {policy_name}", summary)
                    + ("" if not missed else "  BELOW GOAL: " + "; ".join(missed))
                )
    report.update(comparison=comparison, variations=variations, goalsMet=ok)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print("all goals met" if ok else "some goals missed (BELOW GOAL above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
