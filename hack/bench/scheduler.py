#!/usr/bin/env python3
"""How much the real kube-scheduler slows down with the requestPolicy of dra-cpu's consumable capacity (issue #13),
printed. Needs the control plane of hack/testenv/kubernetes.sh (`hack/install-testenv.sh`); run from the
repository root:

    .venv/bin/python hack/bench/scheduler.py [--nodes 100] [--pods 200] [--rounds 2] [--quick] [--json]

It starts etcd, kube-apiserver, kube-scheduler and kube-controller-manager on loopback
(tests/harness/cluster/control_plane.py), the chart's DeviceClasses, and then, for each round, two cases, their order
alternating between rounds:

  with       --nodes Ready Nodes sized like tests/fixtures/sysfs/big-8numa (64 CPUs, 8 NUMA nodes), each with the
             ResourceSlices the driver publishes for it (core/devices.build_devices and build_slices, what the
             publisher sends): one slice of 8 CPU devices, one per NUMA node, each with a dra.cpu/cpu capacity
             of 8 and its requestPolicy (default 1, validRange 1 to 8, step 1). The capture reserves no
             hugepages, so there are no hugepage devices.
  without    the same Nodes and slices with every requestPolicy removed.

In each case --pods pods are created one at a time, each using its own ResourceClaim (made before the pod) of
2 dra.cpu/cpu from DeviceClass dra.cpu, each free to go to any of the case's Nodes (a label only keeps them off
Nodes the bench did not make); the next pod is created once a watch saw the previous one bound. A first pod per
case, not counted, waits until the scheduler has the case's slices. The case's Nodes, slices, claims and pods are
deleted before the next case starts.

Printed per case, and the ratio with / without:
  pod created -> bound          p50 and p99 over all rounds, in ms (client side: from the POST to the watch event)
  scheduling attempt            mean, in ms, to the pod bound: PreBind writes the allocation into the claim and
                                Bind the pod, two API calls (scheduler_scheduling_attempt_duration_seconds)
  scheduling algorithm          mean: PreFilter, Filter and Score, the scheduler's own computation
                                (scheduler_scheduling_algorithm_duration_seconds)
  Filter, all plugins           mean per attempt (scheduler_framework_extension_point_duration_seconds)
  DynamicResources Filter       mean per call, one call per Node (scheduler_plugin_execution_duration_seconds,
                                which the scheduler records for about 10% of its attempts)
and the p50 of the algorithm and of the DynamicResources Filter, interpolated within the histogram's bucket as
PromQL's histogram_quantile does (buckets grow by 1.5 to 2 times: a coarse median, but one that a few slow calls do
not move as they move a mean). The histograms come from the scheduler's /metrics, read before and after the
counted pods of each case. PreBind (the allocation written into the claim) and Bind are API calls from the
scheduler's client, whose default rate limit (50 requests/s, burst 100) paces them once a case has used the burst:
the attempt and pod-to-bound times then show that limit (about 4 requests a pod, 80 ms at 50/s) more than the
scheduler's work, alike in both cases. --json prints the same as one JSON object instead. --quick: 3 Nodes, 6 pods,
1 round, to check that it works (the figures then mean little).
Exit 1 when a pod is not bound within 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
# Run as a script: the repository root (for tests/harness) is not on the path by itself.
sys.path.insert(0, str(ROOT))

from dra_cpu.core.devices import DeviceConfig, build_devices, build_slices  # noqa: E402
from dra_cpu.node.sysfs import read_topology  # noqa: E402
from dra_cpu.tools.explain.classes import chart_device_classes  # noqa: E402
from tests.harness.cluster.client import Kube  # noqa: E402
from tests.harness.cluster.control_plane import ALL, SCHEDULER, ControlPlane  # noqa: E402
from tests.harness.cluster.objects import claim_path, create_node, delete_node, ensure, new_namespace  # noqa: E402  # noqa: E402
from tests.harness.cluster.pods import pod_scheduled_condition  # noqa: E402
from tests.harness.nodes.published import node_resources  # noqa: E402
from tests.harness.poll import wait_until  # noqa: E402

SYSFS = ROOT / "tests/fixtures/sysfs/big-8numa"
DRIVER, CLASS, CPUS = "dra.cpu", "dra.cpu", "2"
LABEL = "bench.dra.cpu/case"
BOUND_SECONDS = 60
CASES = ("with", "without")


@dataclass
class Histogram:
    """A Prometheus histogram, or the difference of two readings: sum and count, and cumulative counts by bound."""

    sum: float = 0.0
    count: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    def add(self, other: Histogram, sign: float = 1.0) -> None:
        self.sum += sign * other.sum
        self.count += sign * other.count
        for bound, count in other.buckets.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + sign * count

    def mean_ms(self) -> float | None:
        return self.sum / self.count * 1000 if self.count else None

    def quantile_ms(self, q: float) -> float | None:
        """Interpolated within the bucket it falls in, as PromQL's histogram_quantile does."""
        if not self.count:
            return None
        rank, below, lower = q * self.count, 0.0, 0.0
        for bound in sorted(self.buckets):
            if self.buckets[bound] >= rank:
                if bound == float("inf"):
                    return lower * 1000
                share = (rank - below) / (self.buckets[bound] - below) if self.buckets[bound] > below else 1.0
                return (lower + (bound - lower) * share) * 1000
            below, lower = self.buckets[bound], bound
        return lower * 1000


@dataclass
class Case:
    """What one case measured, over its rounds: pods' times to bound in seconds; the scheduler's histograms."""

    bound: list[float] = field(default_factory=list)
    metrics: dict[str, Histogram] = field(default_factory=dict)


# name -> (metric family, labels a sample must have)
METRICS: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "attempt": ("scheduler_scheduling_attempt_duration_seconds", {"result": "scheduled"}),
    "algorithm": ("scheduler_scheduling_algorithm_duration_seconds", {}),
    "filter": ("scheduler_framework_extension_point_duration_seconds", {"extension_point": "Filter"}),
    "dra_filter": (
        "scheduler_plugin_execution_duration_seconds",
        {"plugin": "DynamicResources", "extension_point": "Filter"},
    ),
}


def scrape(plane: ControlPlane) -> dict[str, Histogram]:
    """METRICS from the scheduler now, each summed over the series whose labels match."""
    found = {name: Histogram() for name in METRICS}
    for family in text_string_to_metric_families(plane.metrics(SCHEDULER)):
        for name, (wanted, labels) in METRICS.items():
            if family.name != wanted:
                continue
            for sample in family.samples:
                if not all(sample.labels.get(k) == v for k, v in labels.items()):
                    continue
                reading = Histogram()
                if sample.name.endswith("_sum"):
                    reading.sum = sample.value
                elif sample.name.endswith("_count"):
                    reading.count = sample.value
                elif sample.name.endswith("_bucket"):
                    reading.buckets[float(sample.labels["le"])] = sample.value
                found[name].add(reading)
    return found


def without_request_policy(slices: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    copies: list[dict[str, Any]] = json.loads(json.dumps(list(slices)))
    for obj in copies:
        for device in obj["spec"]["devices"]:
            for capacity in device.get("capacity", {}).values():
                capacity.pop("requestPolicy", None)
    return copies


def make_nodes(kube: Kube, case: str, count: int, run: str) -> list[str]:
    """Nodes labelled `LABEL=<run>` with the driver's slices (without requestPolicy in the `without` case)."""
    topology = read_topology(SYSFS)
    cpus, memory, hugepages = node_resources(topology)
    names = [f"bench-{run}-{i}" for i in range(count)]
    for name in names:
        create_node(kube.api, name, cpus=cpus, memory=memory, hugepages=hugepages, labels={LABEL: run})
        config = DeviceConfig(node_name=name)
        slices = build_slices(build_devices(topology, config), config)
        for obj in slices if case == "with" else without_request_policy(slices):
            kube.create(obj)
    return names


def claim(name: str) -> dict[str, Any]:
    exactly = {"deviceClassName": CLASS, "capacity": {"requests": {f"{DRIVER}/cpu": CPUS}}}
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [{"name": "cpus", "exactly": exactly}]}},
    }


def pod(name: str, run: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {LABEL: run},
            "resourceClaims": [{"name": "cpus", "resourceClaimName": name}],
            "containers": [{"name": "app", "image": "busybox", "resources": {"claims": [{"name": "cpus"}]}}],
        },
    }


def bound_pods(kube: Kube, namespace: str) -> Iterator[str]:
    """Names of the namespace's pods as a watch sees them bound to a Node, from the call on (the list that the watch
    starts from is made now, not at the first next())."""
    core = client.CoreV1Api(kube.api)
    listed = core.list_namespaced_pod(namespace)
    assert listed.metadata is not None
    stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
        core.list_namespaced_pod,
        namespace,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=BOUND_SECONDS * 10,
        _request_timeout=(5, BOUND_SECONDS),
    )
    return (
        event["object"].metadata.name
        for event in stream
        if event["type"] in ("ADDED", "MODIFIED") and event["object"].spec.node_name
    )


def run_case(plane: ControlPlane, kube: Kube, case: str, nodes: int, pods: int, into: Case) -> None:
    run = f"{case}-{uuid.uuid4().hex[:6]}"
    names = make_nodes(kube, case, nodes, run)
    namespace = new_namespace(kube, "bench")
    try:
        seen = bound_pods(kube, namespace)

        def place(name: str) -> float:
            kube.create(claim(name), namespace)
            start = time.perf_counter()
            kube.create(pod(name, run), namespace)
            try:
                while next(seen) != name:
                    pass
            except Exception as err:  # the watch's read timed out, or the server ended it
                condition = pod_scheduled_condition(kube.get(f"/api/v1/namespaces/{namespace}/pods/{name}"))
                raise SystemExit(
                    f"pod {namespace}/{name} not bound within {BOUND_SECONDS} s ({err!r}); PodScheduled: {condition}"
                ) from None
            return time.perf_counter() - start

        place("warm-up")
        before = scrape(plane)
        into.bound += [place(f"pod-{i}") for i in range(pods)]
        after = scrape(plane)
        for name in METRICS:
            into.metrics.setdefault(name, Histogram()).add(after[name])
            into.metrics[name].add(before[name], -1.0)
    finally:
        clean_up(kube, namespace, names)


def clean_up(kube: Kube, namespace: str, nodes: Sequence[str]) -> None:
    """Pods, claims (once the controller has released them), slices and Nodes of a case, and its namespace."""
    for obj in kube.list(f"/api/v1/namespaces/{namespace}/pods"):
        kube.delete(f"/api/v1/namespaces/{namespace}/pods/{obj['metadata']['name']}", force=True)
    for obj in kube.list(f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims"):
        kube.delete(claim_path(namespace, obj["metadata"]["name"]))
    wait_until(
        lambda: not kube.list(f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims"),
        f"the claims of namespace {namespace} to be deleted",
        timeout=120,
    )
    for name in nodes:
        for obj in kube.list("/apis/resource.k8s.io/v1/resourceslices", field_selector=f"spec.nodeName={name}"):
            kube.delete(f"/apis/resource.k8s.io/v1/resourceslices/{obj['metadata']['name']}")
        delete_node(kube.api, name)
    kube.delete(f"/api/v1/namespaces/{namespace}")


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def figures(cases: Mapping[str, Case]) -> dict[str, dict[str, float | None]]:
    """Row -> case -> value (ms), with the ratio with / without."""
    rows: dict[str, dict[str, float | None]] = {}
    for case, data in cases.items():
        metrics = {name: data.metrics.get(name, Histogram()) for name in METRICS}
        values = {
            "bound_p50_ms": statistics.median(data.bound) * 1000,
            "bound_p99_ms": percentile(data.bound, 99) * 1000,
            **{f"{name}_mean_ms": metrics[name].mean_ms() for name in METRICS},
            **{f"{name}_p50_ms": metrics[name].quantile_ms(0.5) for name in ("algorithm", "dra_filter")},
        }
        for row, value in values.items():
            rows.setdefault(row, {})[case] = value
    for values in rows.values():
        mine, base = values.get("with"), values.get("without")
        values["ratio"] = mine / base if mine is not None and base else None
    return rows


LABELS = {
    "bound_p50_ms": "pod created -> bound, p50 (ms)",
    "bound_p99_ms": "pod created -> bound, p99 (ms)",
    "attempt_mean_ms": "scheduling attempt, mean (ms)",
    "algorithm_mean_ms": "scheduling algorithm, mean (ms)",
    "algorithm_p50_ms": "scheduling algorithm, p50 (ms)",
    "filter_mean_ms": "Filter, all plugins, mean (ms)",
    "dra_filter_mean_ms": "DynamicResources Filter per Node, mean (ms)",
    "dra_filter_p50_ms": "DynamicResources Filter per Node, p50 (ms)",
}


def show(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 Nodes, 6 pods, 1 round: does it work")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args()
    nodes, pods, rounds = (3, 6, 1) if args.quick else (args.nodes, args.pods, args.rounds)
    cases = {case: Case() for case in CASES}
    with tempfile.TemporaryDirectory(prefix="dc-sched-") as tmp, ControlPlane(Path(tmp), ALL) as plane:
        api = plane.admin()
        try:
            kube = Kube(api)
            ensure(kube, chart_device_classes(DRIVER))
            version = kube.get("/version")["gitVersion"]
            for number in range(rounds):
                for case in CASES if number % 2 == 0 else CASES[::-1]:
                    if not args.json:
                        print(f"round {number + 1}/{rounds}: {case} requestPolicy ...", flush=True)
                    run_case(plane, kube, case, nodes, pods, cases[case])
        finally:
            api.close()  # type: ignore[no-untyped-call]
    rows = figures(cases)
    load = os.getloadavg()[0]
    if args.json:
        doc = {"version": version, "nodes": nodes, "pods": pods, "rounds": rounds, "load": load, "figures": rows}
        print(json.dumps({**doc, "bound": {case: len(data.bound) for case, data in cases.items()}}))
        return 0
    print(
        f"kube-scheduler {version}: {nodes} Nodes of big-8numa, {pods} pods x {rounds} rounds per case, "
        f"load average {load:.2f}"
    )
    print(f"{'':46}{'with':>10}{'without':>10}{'ratio':>8}")
    for row, label in LABELS.items():
        values = rows[row]
        print(f"{label:46}{show(values['with']):>10}{show(values['without']):>10}{show(values['ratio'], 2):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
