#!/usr/bin/env python3
"""What memory accounting adds to prepare's decision (issue 23: goal <= 0.2 ms at p50 and p99).

    .venv/bin/python hack/bench/memory_accounting.py [--rounds N] [--held N] [--topology NAME]

Times, in this process, the part of prepare that runs under the driver's lock and decides as data: parse_claim()
of the claim object, grant() against a ledger already holding `--held` claims (default 8, each with CPUs and memory),
bound_memory() and the sharing rule's hold() with the reserving pod (its CPU and memory limits checked). Two claims
on NUMA node 0 of `--topology` (a capture in tests/fixtures/sysfs, default dual-socket-smt2), interleaved round by
round (default 20000 rounds) so that load on the machine hits both alike:

  cpu-only      2 CPUs: the floor, what prepare decides without memory;
  cpu+memory    the same 2 CPUs and 64 MiB of the node's memory device: counted against the node, bound, the pod's
                memory limit checked.

It prints the thread CPU time of each in microseconds (p50, p99) and what memory adds (the differences). Files,
the API server and the runtime are not timed: memory adds nothing there but one more CDI variable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dra_cpu.core.allocator import AllocationPolicy  # noqa: E402
from dra_cpu.core.claims import ClaimRef, allocated_claim_object, allocation_result, parse_claim  # noqa: E402
from dra_cpu.core.devices import DeviceConfig  # noqa: E402
from dra_cpu.core.grant import grant  # noqa: E402
from dra_cpu.core.ledger import Ledger  # noqa: E402
from dra_cpu.core.memory_limit import bound_memory  # noqa: E402
from dra_cpu.core.node_view import NodeSettings, NodeView  # noqa: E402
from dra_cpu.core.sharing import hold  # noqa: E402
from dra_cpu.node.sysfs import read_topology  # noqa: E402

POD = "pod-uid"


def claim_object(uid: str, memory: str) -> dict[str, Any]:
    results = [allocation_result("dra.cpu", "n", "cpu-numa0", consumed={"dra.cpu/cpu": "2"})]
    if memory:
        results.append(
            allocation_result("dra.cpu", "n", "memory-numa0", request="mem", consumed={"dra.cpu/memory": memory})
        )
    return allocated_claim_object("default", uid, results, uid=uid, pod_uids=[POD])


def pod_object(name: str) -> dict[str, Any]:
    resources = {"claims": [{"name": "c"}], "limits": {"cpu": "2", "memory": "64Mi"}}
    return {
        "metadata": {"namespace": "default", "name": "pod", "uid": POD},
        "spec": {
            "resourceClaims": [{"name": "c", "resourceClaimName": name}],
            "containers": [{"name": "app", "resources": resources}],
        },
    }


def decide(view: NodeView, ledger: Ledger, uid: str, memory: str) -> Callable[[], object]:
    obj, pods = claim_object(uid, memory), [pod_object(uid)]
    ref = ClaimRef("default", uid, uid)

    def run() -> object:
        request = parse_claim(obj, ref, driver="dra.cpu", pool="n", default_policy=AllocationPolicy())
        granted = grant(ledger, request, view)
        return hold(granted, request.pod_uids, pods, bound_memory(granted, view))

    return run


def held_ledger(view: NodeView, count: int) -> Ledger:
    """`count` claims of 1 CPU and 1 MiB each, spread over the node's NUMA nodes."""
    ledger = Ledger()
    nodes = sorted(view.memory_capacity)
    for i in range(count):
        numa = nodes[i % len(nodes)]
        results = [
            allocation_result("dra.cpu", "n", f"cpu-numa{numa}", consumed={"dra.cpu/cpu": "1"}),
            allocation_result("dra.cpu", "n", f"memory-numa{numa}", request="mem", consumed={"dra.cpu/memory": "1Mi"}),
        ]
        ref = ClaimRef("default", f"held-{i}", f"held-{i}")
        obj = allocated_claim_object("default", ref.name, results, uid=ref.uid, pod_uids=[f"pod-{i}"])
        request = parse_claim(obj, ref, driver="dra.cpu", pool="n", default_policy=AllocationPolicy())
        ledger = ledger.with_claim(grant(ledger, request, view))
    return ledger


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--held", type=int, default=8)
    parser.add_argument("--topology", default="dual-socket-smt2")
    args = parser.parse_args()
    view = NodeView.of(
        read_topology(ROOT / "tests" / "fixtures" / "sysfs" / args.topology),
        NodeSettings(DeviceConfig(node_name="n", min_shared_cpus=0)),
    )
    ledger = held_ledger(view, args.held)
    cases = {"cpu-only": decide(view, ledger, "bench-cpu", ""), "cpu+memory": decide(view, ledger, "bench-mem", "64Mi")}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            start = time.thread_time_ns()
            run()
            times[name].append((time.thread_time_ns() - start) / 1000)
    print(f"{args.topology}, {args.held} claims held, {args.rounds} rounds; thread CPU time per decision, µs")
    print(f"{'case':<12} {'p50':>8} {'p99':>8}")
    for name, samples in times.items():
        print(f"{name:<12} {percentile(samples, 50):8.1f} {percentile(samples, 99):8.1f}")
    added = {q: percentile(times["cpu+memory"], q) - percentile(times["cpu-only"], q) for q in (50, 99)}
    print(f"{'added':<12} {added[50]:8.1f} {added[99]:8.1f}   (goal <= 200 µs each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
