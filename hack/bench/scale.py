#!/usr/bin/env python3
"""What dra-cpu's slices cost the kube-scheduler, the API server and etcd at cluster scale, against plain `cpu`
requests, printed. Needs the control plane of hack/testenv/kubernetes.sh (`hack/install-testenv.sh`); run from the
repository root:

    .venv/bin/python hack/bench/scale.py [--nodes 100] [--pods-per-node 2] [--cpus 4]
        [--capture big-8numa|synthetic-256] [--gates off,on] [--cases native,numanode,...] [--quick] [--json]
        [--profile CASE]

For each setting of the DRANodeAllocatableResources feature gate in --gates it starts etcd, kube-apiserver,
kube-scheduler and kube-controller-manager 1.37 on loopback (tests/harness/cluster/control_plane.py) with the gate set
so on all three and every other gate at its default (with the gate, an alpha one, the scheduler runs its experimental
allocator; without it the incubating one, as production clusters do), the scheduler's and the controller manager's
client rate limits raised (--kube-api-qps 2000, --kube-api-burst 4000: their own work is measured, not the default 50
and 20 requests/s), the chart's DeviceClasses and the one for DRA extended resources (chart value
deviceClasses.extendedResourceName). It makes --nodes Ready Nodes sized like the capture (big-8numa:
tests/fixtures/sysfs/big-8numa, 64 CPUs in 8 NUMA nodes on 4 sockets; synthetic-256: 256 CPUs, 2 sockets of 4 NUMA nodes
of 16 two-thread cores, written by tests/harness/synthetic_sysfs.py), and runs these cases, each with --pods-per-node x
--nodes pods of --cpus CPUs (requests = limits, as docs/user.md asks without the node-allocatable mapping), in this
order:

  native      no slices; the pods ask only `cpu`: the baseline.
  numanode    every Node carries the slices the driver publishes with its defaults (core/devices.build_slices:
              one consumable-capacity device per NUMA node, and one for each NUMA node's memory); each pod has a
              claim from a ResourceClaimTemplate of --cpus `dra.cpu/cpu` of class dra.cpu.
  nomemory    the same without the memory devices (config.publishMemory: false): what they cost pods that claim
              only CPUs.
  socket      the same with groupBy socket (one device per socket).
  machine     the same with groupBy machine: one device per Node, the floor of what a slice can cost.
  individual  deviceMode individual (one device per CPU); the template asks for --cpus devices (count).
  extended    the individual slices; each pod asks `resources.limits: {dra.cpu/cpu: --cpus}` and no claim: the
              scheduler writes the claim itself (KEP-5004).

Before a shape's cases its slices are created for every Node, and deleted after them. Each case first schedules one
pod on the last Node made (not counted: the scheduler then holds every slice), then stops the scheduler (SIGSTOP),
creates all its pods and, for templates, waits until the controller manager made every claim, and lets the
scheduler go on (SIGCONT): it then finds a full queue, as in a burst of pods, so that its own speed is measured, not
this script's. Printed per case, and as a ratio to native where it says so:

  pods/s              pods bound / seconds from SIGCONT to the last bound (a watch sees `spec.nodeName`)
  bound p50, p99      ms from a pod's creation to its binding, for --latency-pods more pods created one at a time
                      after the burst (each waits for the previous one): the time of one pod in an idle cluster
  algorithm           the scheduler's mean PreFilter + Filter + Score per pod (scheduler_scheduling_algorithm_...)
  DRA Filter          the mean DynamicResources Filter per Node checked, in µs (the scheduler samples ~10% of them)
  sched, api, all ms  CPU per pod (user + system, /proc via psutil) of the scheduler, of the API server, and of all
                      four components, from before the first pod is created to the last bound (the scheduler works
                      only after SIGCONT; the controller manager makes the template claims before it)
  tries               the scheduler's attempts per pod (scheduler_schedule_attempts_total; 1: none failed)
  writes              the API server's write requests (POST, PUT, PATCH, DELETE) per pod over the same span, Events
                      left out (apiserver_request_total); --json has them by verb and resource, and the attempts by
                      result
and, per shape, per Node, for the slices alone (read before and after they are created):
  slice B             the Node's ResourceSlices as compact JSON (as the driver builds them, Kubernetes' encoding)
  apiserver KB        kube-apiserver's live heap (after a GC: /debug/pprof/heap?gc=1), once two readings 5 s apart
                      agree within 0.5% (at most 60 s: its caches let go of the last case's pods for a while)
  etcd KB             etcd's database after a compaction and defragmentation (etcd_mvcc_db_total_size_in_bytes)
  scheduler KB        kube-scheduler's live heap
The slice bytes that turning off the compatibility copies (publishNumaNodeId, publishDraNetNumaNode) saves are
printed per shape too, and the default shape's scheduler CPU per pod over the one-device floor (machine).

--quick: 3 Nodes, 2 pods per Node, 2 latency pods, the gate off only: it checks that every pod of every case binds
(the figures then mean little). --profile CASE: a 20 s CPU profile of the scheduler from SIGCONT of that case,
summarised by `go tool pprof -top` (where the time goes). --json prints one JSON object instead of the tables.
Exit 1 when a pod is not bound within --bound-seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
# Run as a script: the repository root (for tests/harness) is not on the path by itself.
sys.path.insert(0, str(ROOT))

from dra_cpu.bench.report import percentile  # noqa: E402
from dra_cpu.core.devices import DeviceConfig, DeviceMode, GroupBy, build_devices, build_slices  # noqa: E402
from dra_cpu.core.topology import Topology  # noqa: E402
from dra_cpu.node.sysfs import read_topology  # noqa: E402
from dra_cpu.tools.explain.classes import EXTENDED_RESOURCE, chart_device_classes  # noqa: E402
from tests.harness.cluster.client import Kube, close_api_client  # noqa: E402
from tests.harness.cluster.control_plane import (  # noqa: E402
    ALL,
    APISERVER,
    CONTROLLER_MANAGER,
    ETCD,
    SCHEDULER,
    ControlPlane,
)
from tests.harness.cluster.objects import create_node, ensure, new_namespace  # noqa: E402
from tests.harness.cluster.scheduler_metrics import Histogram, difference, scrape  # noqa: E402
from tests.harness.nodes.published import node_resources  # noqa: E402
from tests.harness.poll import wait_until  # noqa: E402
from tests.harness.synthetic_sysfs import uniform_machine, write_tree  # noqa: E402

DRIVER = "dra.cpu"
GATE = "DRANodeAllocatableResources"
SLICES = "/apis/resource.k8s.io/v1/resourceslices"
RAISED_CLIENT_LIMITS = ("--kube-api-qps=2000", "--kube-api-burst=4000")
WRITES = ("POST", "PUT", "PATCH", "DELETE")
HEAP_ALLOC = re.compile(r"^# HeapAlloc = (\d+)$", re.MULTILINE)
CLIENT_THREADS = 8


@dataclass(frozen=True)
class Shape:
    """What each Node publishes: the driver's device mode and grouping."""

    name: str
    mode: DeviceMode = DeviceMode.GROUPED
    group_by: GroupBy = GroupBy.NUMA_NODE
    memory: bool = True  # config.publishMemory: a memory device per NUMA node beside the CPU devices

    def config(self, node: str, upstream_numa: bool = True, dranet_numa: bool = True) -> DeviceConfig:
        return DeviceConfig(
            node_name=node,
            device_mode=self.mode,
            group_by=self.group_by,
            upstream_numa_attribute=upstream_numa,
            dranet_numa_attribute=dranet_numa,
            memory_devices=self.memory,
        )


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("numanode"),
        Shape("nomemory", memory=False),
        Shape("socket", group_by=GroupBy.SOCKET),
        Shape("machine", group_by=GroupBy.MACHINE),
        Shape("individual", mode=DeviceMode.INDIVIDUAL),
    )
}


@dataclass(frozen=True)
class Case:
    name: str
    shape: Shape | None  # the slices every Node carries during the case; None: none
    ask: str  # "cpu": resources only; "template": a claim from a ResourceClaimTemplate; "extended": KEP-5004


CASES = {
    case.name: case
    for case in (
        Case("native", None, "cpu"),
        *(Case(name, shape, "template") for name, shape in SHAPES.items()),
        Case("extended", SHAPES["individual"], "extended"),
    )
}


@dataclass
class Outcome:
    """What one case measured."""

    pods: int = 0
    seconds: float = 0.0  # SIGCONT to the last pod bound
    latencies: list[float] = field(default_factory=list)  # created -> bound, one pod at a time, seconds
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # component -> CPU seconds during the burst
    writes: Counter[str] = field(default_factory=Counter)  # "VERB resource[/subresource]" -> requests
    attempts: Counter[str] = field(default_factory=Counter)  # the scheduler's attempts by result
    metrics: dict[str, Histogram] = field(default_factory=dict)


@dataclass(frozen=True)
class Footprint:
    """Bytes per Node that a shape's slices add: (the slices' JSON, API server heap, etcd database, scheduler heap)."""

    slices: float
    apiserver: float
    etcd: float
    scheduler: float


# ----------------------------------------------------------------------------------------------------------------
# The machine every Node stands for.


def machine(capture: str, tmp: Path) -> Topology:
    if capture == "synthetic-256":
        cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=4, cores_per_node=16, threads=2)
        return read_topology(write_tree(tmp / "synthetic-256", cpus, nodes))
    return read_topology(ROOT / "tests" / "fixtures" / "sysfs" / capture)


def slices_of(
    topology: Topology, shape: Shape, node: str, upstream_numa: bool = True, dranet_numa: bool = True
) -> list[dict[str, Any]]:
    config = shape.config(node, upstream_numa, dranet_numa)
    return build_slices(build_devices(topology, config), config)


def json_bytes(objs: Sequence[Mapping[str, Any]]) -> int:
    return len(json.dumps(list(objs), separators=(",", ":")))


def compatibility_savings(topology: Topology, shape: Shape) -> tuple[int, int]:
    """Slice bytes per Node saved by turning off dra.cpu/numaNodeID, and by turning off both copies."""
    full = json_bytes(slices_of(topology, shape, "node"))
    upstream = json_bytes(slices_of(topology, shape, "node", upstream_numa=False))
    both = json_bytes(slices_of(topology, shape, "node", upstream_numa=False, dranet_numa=False))
    return full - upstream, full - both


# ----------------------------------------------------------------------------------------------------------------
# Reading the components.


def cpu_seconds(plane: ControlPlane) -> dict[str, float]:
    found = {}
    for name in (APISERVER, SCHEDULER, CONTROLLER_MANAGER, ETCD):
        times = psutil.Process(plane.pid(name)).cpu_times()
        found[name] = times.user + times.system
    return found


def written(labels: Mapping[str, str]) -> str | None:
    """The key a write request is counted under ("PATCH pods/status"); None for other requests."""
    if labels.get("verb") not in WRITES:
        return None
    sub = labels.get("subresource")
    return f"{labels['verb']} {labels.get('resource')}{'/' + sub if sub else ''}"


def attempt(labels: Mapping[str, str]) -> str | None:
    return labels.get("result")


# A counter (as the parser names it, without _total) and the key a sample counts under.
CounterKey = tuple[str, Callable[[Mapping[str, str]], str | None]]
WRITTEN: CounterKey = ("apiserver_request", written)
ATTEMPTS: CounterKey = ("scheduler_schedule_attempts", attempt)


def counters(plane: ControlPlane, component: str, counter: CounterKey) -> Counter[str]:
    """A component's counter so far, summed by key (e.g. the API server's write requests by verb and resource)."""
    name, key = counter
    found: Counter[str] = Counter()
    for family in text_string_to_metric_families(plane.metrics(component)):
        if family.name == name:
            for sample in family.samples:
                where = key(sample.labels)
                if sample.name.endswith("_total") and where is not None:
                    found[where] += int(sample.value)
    return found


def live_heap(plane: ControlPlane, name: str) -> int:
    """A Go component's heap in use after a garbage collection that the request asks for."""
    found = HEAP_ALLOC.search(plane.read(name, "/debug/pprof/heap?gc=1&debug=1", timeout=300).decode())
    if found is None:
        raise SystemExit(f"{name}: no HeapAlloc in its heap profile")
    return int(found.group(1))


def etcd_call(plane: ControlPlane, path: str, body: Mapping[str, Any]) -> Any:
    request = urllib.request.Request(
        plane.etcd_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def etcd_size(plane: ControlPlane) -> int:
    """etcd's database once the history is compacted away and the file defragmented: the data it holds now."""
    revision = int(etcd_call(plane, "/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
    etcd_call(plane, "/v3/kv/compaction", {"revision": revision, "physical": True})
    etcd_call(plane, "/v3/maintenance/defragment", {})
    for family in text_string_to_metric_families(plane.metrics(ETCD)):
        if family.name == "etcd_mvcc_db_total_size_in_bytes":
            return int(family.samples[0].value)
    raise SystemExit("etcd: no etcd_mvcc_db_total_size_in_bytes in its metrics")


def memory(plane: ControlPlane, settle: float = 60.0) -> tuple[int, int, int]:
    """(API server heap, etcd database, scheduler heap), once the API server's heap holds still: after a case its
    caches let go of the deleted pods and claims for a while, which would count against the next slices."""
    deadline, last = time.monotonic() + settle, live_heap(plane, APISERVER)
    while time.monotonic() < deadline:
        time.sleep(5)
        heap = live_heap(plane, APISERVER)
        if abs(heap - last) < last / 200:
            break
        last = heap
    return last, etcd_size(plane), live_heap(plane, SCHEDULER)


# ----------------------------------------------------------------------------------------------------------------
# Objects.


def make_nodes(kube: Kube, topology: Topology, count: int) -> list[str]:
    cpus, memory_bytes, hugepages = node_resources(topology)
    names = [f"scale-{i:05d}" for i in range(count)]
    parallel(lambda name: create_node(kube.api, name, cpus=cpus, memory=memory_bytes, hugepages=hugepages), names)
    return names


def parallel(work: Callable[[str], object], items: Sequence[str]) -> None:
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(work, items))


def publish(kube: Kube, topology: Topology, shape: Shape, nodes: Sequence[str]) -> int:
    """Every Node's slices of `shape`; returns their JSON bytes in all."""
    sizes: list[int] = []

    def one(node: str) -> None:
        objs = slices_of(topology, shape, node)
        sizes.append(json_bytes(objs))
        for obj in objs:
            kube.create(obj)

    parallel(one, nodes)
    return sum(sizes)


def remove_slices(kube: Kube) -> None:
    kube.request("DELETE", SLICES, query=[("fieldSelector", f"spec.driver={DRIVER}")])
    wait_until(lambda: not kube.list(SLICES) or None, "the slices to be deleted", timeout=600)


def template(shape: Shape, cpus: int) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": DRIVER}
    if shape.mode is DeviceMode.INDIVIDUAL:
        exactly.update(allocationMode="ExactCount", count=cpus)
    else:
        exactly["capacity"] = {"requests": {f"{DRIVER}/cpu": str(cpus)}}
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": "cpus"},
        "spec": {"spec": {"devices": {"requests": [{"name": "cpus", "exactly": exactly}]}}},
    }


def pod(name: str, case: Case, cpus: int, node: str | None = None) -> dict[str, Any]:
    amounts = {"cpu": str(cpus), "memory": "64Mi"}
    if case.ask == "extended":
        amounts[EXTENDED_RESOURCE] = str(cpus)
    container: dict[str, Any] = {
        "name": "app",
        "image": "busybox",
        "resources": {"requests": amounts, "limits": amounts},
    }
    # No kubelet confirms a pod's end: a grace period of 0 lets the namespace's deletion remove them at once.
    spec: dict[str, Any] = {"terminationGracePeriodSeconds": 0, "containers": [container]}
    if case.ask == "template":
        spec["resourceClaims"] = [{"name": "cpus", "resourceClaimTemplateName": "cpus"}]
        container["resources"]["claims"] = [{"name": "cpus"}]
    if node is not None:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


# ----------------------------------------------------------------------------------------------------------------
# Watching pods get bound.


class Bindings:
    """Watches the pods of a namespace and records when each is first seen bound (monotonic time). The API server
    ends a watch whose reader falls behind (a burst of pods while this process creates them): the watch then starts
    again where it was, or from a fresh list when that is too old."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.bound: dict[str, float] = {}
        self.ended: Exception | None = None
        self._kube, self._path = kube, f"/api/v1/namespaces/{namespace}/pods"
        self._changed = threading.Condition()
        self._closed = False
        self._response: Any = None
        self._version = self._list()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _list(self) -> str:
        listed = self._kube.request("GET", self._path)
        for obj in listed["items"]:
            self._seen(obj)
        return str(listed["metadata"]["resourceVersion"])

    def _seen(self, obj: Mapping[str, Any]) -> None:
        if obj.get("spec", {}).get("nodeName"):
            with self._changed:
                self.bound.setdefault(obj["metadata"]["name"], time.monotonic())
                self._changed.notify_all()

    def _read(self) -> None:
        try:
            while not self._closed:
                query = [("watch", "1"), ("resourceVersion", self._version), ("allowWatchBookmarks", "true")]
                serialized = self._kube.api.param_serialize(
                    "GET", self._path, query_params=query, auth_settings=["BearerToken"]
                )
                self._response = self._kube.api.call_api(*serialized).response
                if self._closed:
                    break
                for line in self._lines():
                    event = json.loads(line)
                    obj = event.get("object", {})
                    if event.get("type") == "ERROR":  # 410 Gone: the version is too old to watch from
                        self._version = self._list()
                        break
                    self._version = obj["metadata"]["resourceVersion"]
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._seen(obj)
                self._response.release_conn()
        except Exception as err:  # close() ends the read this way; wait() reports any other end
            if not self._closed:
                self.ended = err
        with self._changed:
            self._changed.notify_all()

    def _lines(self) -> Iterator[bytes]:
        """The watch's events, one JSON line each, as soon as the server sends them (each event is a chunk of the
        chunked response: reading a fixed amount would wait for more)."""
        pending = b""
        for chunk in self._response.stream(None):
            *lines, pending = (pending + chunk).split(b"\n")
            yield from (line for line in lines if line.strip())

    def wait(self, names: Sequence[str], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._changed:
            while not all(name in self.bound for name in names):
                if not self._thread.is_alive():
                    raise SystemExit(f"the watch of pods ended: {self.ended!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [n for n in names if n not in self.bound]
                    raise SystemExit(f"{len(missing)} pod(s) not bound within {seconds:.0f} s, e.g. {missing[:3]}")
                self._changed.wait(min(left, 1.0))

    def close(self) -> None:
        self._closed = True
        if self._response is not None:
            self._response.shutdown()  # unblocks the reading thread
        self._thread.join(timeout=30)


@contextmanager
def paused(plane: ControlPlane) -> Iterator[None]:
    pid = plane.pid(SCHEDULER)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# ----------------------------------------------------------------------------------------------------------------
# One case.


@dataclass(frozen=True)
class Settings:
    pods: int
    cpus: int
    latency_pods: int
    bound_seconds: float
    profile: str


def run_case(plane: ControlPlane, kube: Kube, case: Case, last_node: str, settings: Settings) -> Outcome:
    namespace = new_namespace(kube, f"scale-{case.name}")
    bindings = Bindings(kube, namespace)
    try:
        if case.ask == "template":
            assert case.shape is not None
            kube.create(template(case.shape, settings.cpus), namespace)
        # The scheduler has every slice once it can place a pod on the Node whose slices were made last.
        kube.create(pod("warm-up", case, settings.cpus, last_node), namespace)
        bindings.wait(["warm-up"], settings.bound_seconds)
        names = [f"pod-{i:05d}" for i in range(settings.pods)]
        outcome = Outcome(pods=len(names))
        # From before the first pod: the API server's, etcd's and the controller manager's work for the pods and
        # their claims counts wherever it happens (the scheduler does none while it is stopped).
        writes_before, attempts_before = counters(plane, APISERVER, WRITTEN), counters(plane, SCHEDULER, ATTEMPTS)
        metrics_before, cpu_before = scrape(plane.metrics(SCHEDULER)), cpu_seconds(plane)
        with paused(plane):
            parallel(lambda name: kube.create(pod(name, case, settings.cpus), namespace), names)
            if case.ask == "template":
                wait_until(
                    lambda: (
                        len(kube.list(f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims"))
                        > settings.pods
                        or None
                    ),
                    "the controller manager to make every pod's claim",
                    timeout=settings.bound_seconds,
                )
            start = time.monotonic()
        profile = profiler(plane, case, settings)
        bindings.wait(names, settings.bound_seconds)
        outcome.seconds = max(bindings.bound[n] for n in names) - start
        cpu_after = cpu_seconds(plane)
        outcome.cpu_seconds = {name: cpu_after[name] - cpu_before[name] for name in cpu_after}
        outcome.metrics = difference(scrape(plane.metrics(SCHEDULER)), metrics_before)
        outcome.writes = counters(plane, APISERVER, WRITTEN) - writes_before
        outcome.attempts = counters(plane, SCHEDULER, ATTEMPTS) - attempts_before
        if profile is not None:
            profile.join()
        for i in range(settings.latency_pods):
            name = f"one-{i:03d}"
            created = time.monotonic()
            kube.create(pod(name, case, settings.cpus), namespace)
            bindings.wait([name], settings.bound_seconds)
            outcome.latencies.append(bindings.bound[name] - created)
        return outcome
    finally:
        bindings.close()
        kube.delete(f"/api/v1/namespaces/{namespace}")
        wait_until(
            lambda: kube.find(f"/api/v1/namespaces/{namespace}") is None or None,
            f"namespace {namespace} (its pods and claims) to be deleted",
            timeout=900,
        )


def profiler(plane: ControlPlane, case: Case, settings: Settings) -> threading.Thread | None:
    """For the case named by --profile: a thread that reads a 20 s CPU profile of the scheduler and prints its top
    functions (`go tool pprof -top`) to stderr."""
    if settings.profile != case.name:
        return None
    thread = threading.Thread(target=profile_top, args=(plane, case.name), daemon=True)
    thread.start()
    return thread


def profile_top(plane: ControlPlane, case: str) -> None:
    raw = plane.read(SCHEDULER, "/debug/pprof/profile?seconds=20", timeout=120)
    with tempfile.NamedTemporaryFile(prefix=f"scheduler-{case}-", suffix=".pb.gz", delete=False) as out:
        out.write(raw)
    shown = subprocess.run(
        ["go", "tool", "pprof", "-top", "-nodecount=40", out.name], capture_output=True, text=True, check=False
    )
    print(f"scheduler CPU profile during case {case} ({out.name}):\n{shown.stdout or shown.stderr}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# One control plane per setting of the gate.


@dataclass
class Plane:
    gate: bool
    version: str = ""
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    footprints: dict[str, Footprint] = field(default_factory=dict)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_plane(gate: bool, topology: Topology, cases: Sequence[str], nodes: int, settings: Settings, tmp: Path) -> Plane:
    found = Plane(gate)
    extra = {SCHEDULER: RAISED_CLIENT_LIMITS, CONTROLLER_MANAGER: RAISED_CLIENT_LIMITS, ETCD: ("--enable-pprof",)}
    state = tmp / f"gate-{'on' if gate else 'off'}"
    # Every other gate at its 1.37 default, as in a production cluster: an alpha gate (such as the tests'
    # DRAListTypeAttributes) switches the scheduler to its experimental allocator.
    with ControlPlane(state, ALL, {GATE: gate}, extra) as plane:
        api = plane.admin()
        try:
            kube = Kube(api)
            ensure(kube, chart_device_classes(DRIVER, extended_resource=EXTENDED_RESOURCE))
            found.version = kube.get("/version")["gitVersion"]
            progress(f"{GATE} {'on' if gate else 'off'}: making {nodes} Nodes")
            names = make_nodes(kube, topology, nodes)
            if "native" in cases:
                progress("case native")
                found.outcomes["native"] = run_case(plane, kube, CASES["native"], names[-1], settings)
            for shape in SHAPES.values():
                mine = [name for name in cases if CASES[name].shape == shape]
                if not mine:
                    continue
                progress(f"publishing the {shape.name} slices")
                before = memory(plane)
                total = publish(kube, topology, shape, names)
                after = memory(plane)
                found.footprints[shape.name] = Footprint(
                    total / nodes, *((a - b) / nodes for a, b in zip(after, before, strict=True))
                )
                for name in mine:
                    progress(f"case {name}")
                    found.outcomes[name] = run_case(plane, kube, CASES[name], names[-1], settings)
                remove_slices(kube)
        finally:
            close_api_client(api)
    return found


# ----------------------------------------------------------------------------------------------------------------
# Figures.

Row = dict[str, float | None]


def events_left_out(counts: Mapping[str, int]) -> int:
    return sum(n for key, n in counts.items() if not key.split(" ")[1].startswith("events"))


def figures(plane: Plane) -> dict[str, Row]:
    """case -> figure -> value."""
    native = plane.outcomes.get("native")
    native_rate = native.pods / native.seconds if native and native.seconds else None
    rows: dict[str, Row] = {}
    for name, outcome in plane.outcomes.items():
        rate = outcome.pods / outcome.seconds if outcome.seconds else None
        ordered = sorted(outcome.latencies)
        dra_filter = outcome.metrics["dra_filter"].mean_ms()
        shape = CASES[name].shape
        footprint = plane.footprints.get(shape.name) if shape else None
        rows[name] = {
            "pods_per_s": rate,
            "vs_native": rate / native_rate if rate and native_rate else None,
            "bound_p50_ms": percentile(ordered, 0.5) * 1000 if ordered else None,
            "bound_p99_ms": percentile(ordered, 0.99) * 1000 if ordered else None,
            "algorithm_ms": outcome.metrics["algorithm"].mean_ms(),
            "dra_filter_us": dra_filter * 1000 if dra_filter is not None else None,
            "scheduler_cpu_ms": outcome.cpu_seconds[SCHEDULER] / outcome.pods * 1000,
            "apiserver_cpu_ms": outcome.cpu_seconds[APISERVER] / outcome.pods * 1000,
            "plane_cpu_ms": sum(outcome.cpu_seconds.values()) / outcome.pods * 1000,
            "attempts_per_pod": sum(outcome.attempts.values()) / outcome.pods,
            "writes_per_pod": events_left_out(outcome.writes) / outcome.pods,
            "slice_bytes": footprint.slices if footprint else None,
            "apiserver_kb": footprint.apiserver / 1024 if footprint else None,
            "etcd_kb": footprint.etcd / 1024 if footprint else None,
            "scheduler_kb": footprint.scheduler / 1024 if footprint else None,
        }
    return rows


COLUMNS = {
    "pods_per_s": ("pods/s", 1),
    "vs_native": ("xnative", 2),
    "bound_p50_ms": ("p50 ms", 0),
    "bound_p99_ms": ("p99 ms", 0),
    "algorithm_ms": ("algo ms", 2),
    "dra_filter_us": ("Filter us", 0),
    "scheduler_cpu_ms": ("sched ms", 2),
    "apiserver_cpu_ms": ("api ms", 1),
    "plane_cpu_ms": ("all ms", 1),
    "attempts_per_pod": ("tries", 2),
    "writes_per_pod": ("writes", 1),
    "slice_bytes": ("slice B", 0),
    "apiserver_kb": ("api KB", 1),
    "etcd_kb": ("etcd KB", 1),
    "scheduler_kb": ("sched KB", 1),
}


def show(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tables(report: Mapping[str, Any]) -> None:
    print(
        f"kube-scheduler {report['version']}: {report['nodes']} Nodes of {report['capture']}, {report['pods']} pods "
        f"of {report['cpus']} CPUs per case (+{report['latencyPods']} one at a time), load average "
        f"{report['load']:.2f}"
    )
    print(
        "pods/s from SIGCONT to the last pod bound; p50/p99: created -> bound one at a time; algo: the scheduler's "
        "algorithm per pod; Filter: DynamicResources Filter per Node; sched/api/all ms: CPU per pod of the scheduler, "
        "the API server, all four components; tries: scheduling attempts per pod; writes: API writes per pod without "
        "Events; slice B, api/etcd/sched KB: per Node, for the shape's slices"
    )
    for gate, plane in report["planes"].items():
        print(f"\n{GATE} {gate}")
        print(f"{'case':12}" + "".join(f"{label:>10}" for label, _ in COLUMNS.values()))
        for case, row in plane["figures"].items():
            print(f"{case:12}" + "".join(f"{show(row[k], d):>10}" for k, (_, d) in COLUMNS.items()))
        floor = plane["figures"].get("machine", {}).get("scheduler_cpu_ms")
        default = plane["figures"].get("numanode", {}).get("scheduler_cpu_ms")
        if floor and default:
            print(f"scheduler CPU per pod, numanode / machine (the one-device floor): {default / floor:.2f}")
    print("\nslice bytes per Node saved by turning off the compatibility copies (of the bytes above):")
    for shape, saved in report["compatibility"].items():
        print(
            f"  {shape:12} publishNumaNodeId: false saves {saved['numaNodeId']} B, with publishDraNetNumaNode: "
            f"false too {saved['both']} B of {saved['full']} B"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--pods-per-node", type=float, default=2.0)
    parser.add_argument("--cpus", type=int, default=4, help="CPUs per pod")
    parser.add_argument("--latency-pods", type=int, default=20, help="pods created one at a time after the burst")
    parser.add_argument("--capture", choices=("big-8numa", "synthetic-256"), default="big-8numa")
    parser.add_argument("--gates", default="off,on", help=f"{GATE} settings to run, e.g. off or off,on")
    parser.add_argument("--cases", default=",".join(CASES), help="cases to run (native first)")
    parser.add_argument("--bound-seconds", type=float, default=900.0, help="how long every pod of a burst may take")
    parser.add_argument("--profile", default="", metavar="CASE", help="CPU-profile the scheduler during CASE")
    parser.add_argument("--quick", action="store_true", help="3 Nodes, 6 pods a case, gate off: does it work")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the tables")
    args = parser.parse_args()
    # Stopped (e.g. by timeout), it still stops what it started: the `with` blocks' exits run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.nodes, args.pods_per_node, args.latency_pods, args.gates = 3, 2.0, 2, "off"
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES] + [g for g in args.gates.split(",") if g not in ("off", "on")]
    if unknown:
        parser.error(f"unknown case or gate setting {', '.join(unknown)} (cases: {', '.join(CASES)}; gates: off, on)")
    settings = Settings(
        pods=round(args.nodes * args.pods_per_node),
        cpus=args.cpus,
        latency_pods=args.latency_pods,
        bound_seconds=args.bound_seconds,
        profile=args.profile,
    )
    planes: dict[str, Plane] = {}
    with tempfile.TemporaryDirectory(prefix="dc-scale-") as tmp:
        topology = machine(args.capture, Path(tmp))
        for gate in args.gates.split(","):
            planes[gate] = run_plane(gate == "on", topology, cases, args.nodes, settings, Path(tmp))
    compatibility = {}
    for name, shape in SHAPES.items():
        upstream, both = compatibility_savings(topology, shape)
        full = json_bytes(slices_of(topology, shape, "node"))
        compatibility[name] = {"numaNodeId": upstream, "both": both, "full": full}
    report = {
        "version": next(iter(planes.values())).version,
        "capture": args.capture,
        "nodes": args.nodes,
        "pods": settings.pods,
        "cpus": args.cpus,
        "latencyPods": args.latency_pods,
        "load": os.getloadavg()[0],
        "planes": {
            gate: {
                "figures": figures(plane),
                "bound": {case: outcome.pods for case, outcome in plane.outcomes.items()},
                "writes": {case: dict(outcome.writes) for case, outcome in plane.outcomes.items()},
                "attempts": {case: dict(outcome.attempts) for case, outcome in plane.outcomes.items()},
            }
            for gate, plane in planes.items()
        },
        "compatibility": compatibility,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_tables(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
