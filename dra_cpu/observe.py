"""Prometheus metrics, /healthz and /readyz on one small HTTP server.

Gauges are computed at scrape time from the driver's state, so they can never drift from it. Labels are NUMA
nodes, page sizes and results: never claim UIDs (unbounded cardinality).

The upstream driver's metrics (kubernetes-sigs/dra-driver-cpu pkg/metrics, UPSTREAM below) are served beside ours
under their names, labels and meanings, so that its dashboards keep working; docs/admin.md has the table.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.errors import DraCpuError

LOG = logging.getLogger("dra_cpu.observe")


@dataclass
class OperationMetrics:
    """What the driver records per operation; one instance per daemon, on its own registry."""

    registry: CollectorRegistry
    prepares: Counter = field(init=False)
    unprepares: Counter = field(init=False)
    prepare_seconds: Histogram = field(init=False)
    upstream: UpstreamOperations = field(init=False)
    # Per result (ok or not), our counter's child and the upstream one's: made once, since a labels() lookup costs
    # more than the count, and both results show from the start, at 0, as the upstream driver's do.
    _prepared: dict[bool, tuple[Counter, Counter]] = field(init=False)
    _unprepared: dict[bool, tuple[Counter, Counter]] = field(init=False)

    def __post_init__(self) -> None:
        self.prepares = Counter(
            "dra_cpu_prepare", "NodePrepareResources claims by result", ["result"], registry=self.registry
        )
        self.unprepares = Counter(
            "dra_cpu_unprepare", "NodeUnprepareResources claims by result", ["result"], registry=self.registry
        )
        self.prepare_seconds = Histogram(
            "dra_cpu_prepare_duration_seconds",
            "time to prepare one claim",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
        )

        self.upstream = UpstreamOperations(self.registry)
        results = {True: "success", False: "error"}
        self._prepared = {
            ok: (self.prepares.labels(result=r), self.upstream.prepares.labels(result=r)) for ok, r in results.items()
        }
        self._unprepared = {
            ok: (self.unprepares.labels(result=r), self.upstream.unprepares.labels(result=r))
            for ok, r in results.items()
        }

    def record_prepare(self, ok: bool, seconds: float) -> None:
        for counter in self._prepared[ok]:
            counter.inc()
        self.prepare_seconds.observe(seconds)
        self.upstream.prepare_seconds.observe(seconds)

    def record_unprepare(self, ok: bool) -> None:
        for counter in self._unprepared[ok]:
            counter.inc()

    def record_new_claim(self, cpus: int) -> None:
        self.upstream.claim_cpus.observe(cpus)


# client_golang's prometheus.DefBuckets, which upstream's duration histogram uses (Python's default has three more).
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class UpstreamOperations:
    """The upstream driver's operation metrics (its names, labels and buckets; result `unknown` never happens here)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.prepares = Counter(
            "dra_cpu_prepare_claims", "Total number of per-claim PrepareResourceClaims results.", ["result"],
            registry=registry,
        )  # fmt: skip
        self.unprepares = Counter(
            "dra_cpu_unprepare_claims", "Total number of per-claim UnprepareResourceClaims results.", ["result"],
            registry=registry,
        )  # fmt: skip
        for counter in (self.prepares, self.unprepares):
            for result in ("success", "error", "unknown"):
                counter.labels(result=result)
        self.prepare_seconds = Histogram(
            "dra_cpu_prepare_claim_duration_seconds", "Duration of per-claim prepare operations in seconds.",
            buckets=GO_DEFAULT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.claim_cpus = Histogram(
            "dra_cpu_claim_allocated_cpus", "Number of CPUs allocated for each newly successful claim allocation.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=registry,
        )  # fmt: skip


@dataclass(eq=False)  # the registry keys collectors by identity
class StateCollector(Collector):
    """Gauges read from the running daemon at scrape time. `snapshot` returns a View of the moment."""

    snapshot: Callable[[], View]
    _last_times: list[Any] = field(default_factory=list)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self.snapshot()
        topo = view.topology
        allocatable = GaugeMetricFamily("dra_cpu_cpus_allocatable", "CPUs claims may get", labels=["numa_node"])
        allocated = GaugeMetricFamily("dra_cpu_cpus_allocated", "CPUs held by prepared claims", labels=["numa_node"])
        shared = GaugeMetricFamily("dra_cpu_cpus_shared", "CPUs of the shared pool", labels=["numa_node"])
        busy = GaugeMetricFamily(
            "dra_cpu_cpu_busy_ratio", "busy fraction since the last scrape", labels=["numa_node", "pool"]
        )
        usage = self._busy_by_cpu()
        for node in topo.numa_nodes:
            if not node.cpus:
                continue
            label = [str(node.id)]
            claimed = node.cpus & view.allocated
            allocatable.add_metric(label, len(node.cpus & view.allocatable))
            allocated.add_metric(label, len(claimed))
            shared.add_metric(label, len(node.cpus & view.shared))
            for pool, cpus in (("claimed", claimed), ("shared", node.cpus & view.shared)):
                values = [usage[c] for c in cpus if c in usage]
                if values:
                    busy.add_metric([str(node.id), pool], sum(values) / len(values))
        yield from (allocatable, allocated, shared, busy)

        huge_total = GaugeMetricFamily(
            "dra_cpu_hugepages_allocatable_bytes", "reserved hugepages", labels=["numa_node", "page_size"]
        )
        huge_used = GaugeMetricFamily(
            "dra_cpu_hugepages_allocated_bytes", "hugepages held by claims", labels=["numa_node", "page_size"]
        )
        for node in topo.numa_nodes:
            for pool in node.hugepages:
                labels = [str(node.id), pool.quantity]
                huge_total.add_metric(labels, pool.total * pool.size_bytes)
                used = sum(
                    g.bytes
                    for c in view.claims
                    for g in c.hugepages
                    if g.numa_node == node.id and g.page_size_kib == pool.size_kib
                )
                huge_used.add_metric(labels, used)
        yield from (huge_total, huge_used)

        memory_total = GaugeMetricFamily(
            "dra_cpu_memory_allocatable_bytes",
            "memory claims may get (MemTotal less pages and reservedMemory)",
            labels=["numa_node"],
        )
        memory_used = GaugeMetricFamily("dra_cpu_memory_allocated_bytes", "memory held by claims", labels=["numa_node"])
        for node, capacity in sorted(view.memory.items()):
            memory_total.add_metric([str(node)], capacity)
            memory_used.add_metric([str(node)], view.memory_allocated.get(node, 0))
        yield from (memory_total, memory_used)

        yield GaugeMetricFamily("dra_cpu_active_claims", "prepared claims", value=len(view.claims))
        yield from _upstream_gauges(view)
        yield GaugeMetricFamily(
            "dra_cpu_nri_connected", "1 while NRI is connected and synchronized", value=view.nri_connected
        )
        for counter in fields(Counts):
            value = float(getattr(view.counts, counter.name))
            yield GaugeMetricFamily(counter.metadata["name"], counter.metadata["help"], value=value)

    def _busy_by_cpu(self) -> dict[int, float]:
        """Busy fraction per CPU since the previous scrape (psutil's cumulative times, differenced)."""
        now = psutil.cpu_times(percpu=True)
        before, self._last_times = self._last_times or now, list(now)
        busy: dict[int, float] = {}
        for cpu, (a, b) in enumerate(zip(before, now, strict=False)):
            total = sum(b) - sum(a)
            idle = (b.idle + getattr(b, "iowait", 0.0)) - (a.idle + getattr(a, "iowait", 0.0))
            if total > 0:
                busy[cpu] = max(0.0, min(1.0, 1 - idle / total))
        return busy


def _gauge(name: str, help_text: str) -> Any:
    """A Counts field, exported as the gauge `name`."""
    return field(default=0, metadata={"name": name, "help": help_text})


@dataclass(frozen=True)
class Counts:
    """The daemon's counters, read at scrape time from the driver, the NRI plugin and the slice publisher: the
    catalogue of their gauges, one field each."""

    claims_unrestorable: int = _gauge(
        "dra_cpu_claims_unrestorable",
        "claims prepared before a restart that this node can no longer honour (the log names each)",
    )
    forged_env: int = _gauge("dra_cpu_forged_env", "containers whose claim env was not theirs")
    nri_update_failures: int = _gauge("dra_cpu_nri_update_failures", "failed NRI container updates")
    shared_claim_refused: int = _gauge(
        "dra_cpu_shared_claim_refused", "containers refused for using a claim prepared for another pod"
    )
    hugetlb_unenforced: int = _gauge(
        "dra_cpu_hugetlb_unenforced", "hugepage claims' containers whose cgroup hugetlb limits could not be set"
    )
    slice_writes: int = _gauge("dra_cpu_slice_writes", "ResourceSlice writes")
    slice_publish_errors: int = _gauge("dra_cpu_slice_publish_errors", "failed ResourceSlice writes")
    slice_dropped_field_warnings: int = _gauge(
        "dra_cpu_slice_dropped_field_warnings", "slices the API server stored without some of our fields"
    )


def _upstream_gauges(view: View) -> Iterator[GaugeMetricFamily]:
    """The upstream driver's allocation gauges, node-wide. `available` is what claims may still get: the published
    CPUs (so without the reserved CPUs and those kept for the shared pool) that no claim holds."""
    yield GaugeMetricFamily(
        "dra_cpu_allocated_cpus", "Number of CPUs currently allocated to prepared resource claims.",
        value=len(view.allocated),
    )  # fmt: skip
    yield GaugeMetricFamily(
        "dra_cpu_available_cpus",
        "Number of CPUs available for allocation after reserved and active claim CPUs are excluded.",
        value=len(view.allocatable - view.allocated),
    )
    yield GaugeMetricFamily(
        "dra_cpu_reserved_cpus", "Number of CPUs reserved and excluded from DRA management.", value=len(view.reserved)
    )
    yield GaugeMetricFamily(
        "dra_cpu_resource_claims_active",
        "Number of resource claims currently recorded as active by the allocation store.",
        value=len(view.claims),
    )


@dataclass(frozen=True)
class View:
    """What the collector reads: the daemon fills it from the driver, the publisher and the NRI plugin."""

    topology: Any
    claims: tuple[Any, ...]
    allocatable: CPUSet
    allocated: CPUSet
    shared: CPUSet
    nri_connected: float
    counts: Counts = field(default_factory=Counts)
    reserved: CPUSet = field(default_factory=CPUSet)
    # NUMA node -> bytes: what claims may get (the memory devices' capacity), what they hold.
    memory: Mapping[int, int] = field(default_factory=dict)
    memory_allocated: Mapping[int, int] = field(default_factory=dict)


ReadinessCheck = Callable[[], list[str]]


def serve(address: str, registry: CollectorRegistry, readiness: ReadinessCheck) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz (the process answers) and /readyz (200 only when `readiness` lists no reason)."""
    host, _, port_text = address.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise DraCpuError(f"metricsAddress {address!r}: expected host:port, e.g. :8080") from None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._reply(200, b"ok\n")
            elif self.path == "/readyz":
                reasons = readiness()
                body = ("ok\n" if not reasons else "".join(f"not ready: {r}\n" for r in reasons)).encode()
                self._reply(503 if reasons else 200, body)
            else:
                self._reply(404, b"not found\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            LOG.debug(format % args)

    try:
        server = ThreadingHTTPServer((host or "0.0.0.0", port), Handler)
    except OSError as err:
        raise DraCpuError(f"metricsAddress {address!r}: cannot listen: {err.strerror}") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
