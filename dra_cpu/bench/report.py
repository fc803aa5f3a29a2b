"""Benchmark results as values, and their rendering as tables for people and dicts for JSON. Pure.

JSON field names are the documented contract (docs/benchmarks.md); bump SCHEMA_VERSION when one changes meaning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dra_cpu.bench.numa_maps import Placement
from dra_cpu.core.cpuset import CPUSet

SCHEMA_VERSION = 1
ONE_NODE_NOTE = "only one memory node is available: remote figures need a machine (or claims) with two or more nodes"


@dataclass(frozen=True, slots=True)
class NumaParameters:
    array_bytes: int
    iterations: int
    latency_steps: int
    hugepages: bool
    quick: bool


@dataclass(frozen=True, slots=True)
class PairResult:
    """One (CPU node, memory node) measurement. Figures are None when the placement check failed or on error."""

    cpu_node: int
    memory_node: int
    cpus: CPUSet
    placement: Placement | None = None
    copy_gbps: float | None = None
    triad_gbps: float | None = None
    latency_ns: float | None = None
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None and self.placement is not None and self.placement.valid

    @property
    def reason(self) -> str | None:
        if self.error is not None:
            return self.error
        if self.placement is None:
            return "placement was not checked"
        return self.placement.reason

    def figure(self, metric: str) -> float | None:
        value: float | None = getattr(self, _METRIC_FIELDS[metric])
        return value if self.valid else None


@dataclass(frozen=True, slots=True)
class NumaReport:
    host: str
    cpu_model: str
    parameters: NumaParameters
    results: tuple[PairResult, ...]
    notes: tuple[str, ...] = ()

    @property
    def cpu_nodes(self) -> list[int]:
        return sorted({r.cpu_node for r in self.results})

    @property
    def memory_nodes(self) -> list[int]:
        return sorted({r.memory_node for r in self.results})

    def result(self, cpu_node: int, memory_node: int) -> PairResult | None:
        for r in self.results:
            if (r.cpu_node, r.memory_node) == (cpu_node, memory_node):
                return r
        return None

    def vs_local(self, r: PairResult, metric: str) -> float | None:
        """The pair's figure over the same CPU node's local figure: below 1 for remote bandwidth, above 1 for
        remote latency. None without a valid local figure (a pod whose CPUs' own node is not in its mems)."""
        local = self.result(r.cpu_node, r.cpu_node)
        mine, base = r.figure(metric), local.figure(metric) if local else None
        return mine / base if mine is not None and base else None


# metric name in tables and JSON -> the PairResult field holding it
_METRIC_FIELDS = {"copy": "copy_gbps", "triad": "triad_gbps", "latency": "latency_ns"}
METRIC_TITLES = {
    "copy": "copy bandwidth, GB/s",
    "triad": "triad bandwidth, GB/s",
    "latency": "idle latency, ns (dependent loads over a random permutation)",
}
METRICS = tuple(_METRIC_FIELDS)
CORNER = "cpu\\mem"


def numa_report_dict(report: NumaReport) -> dict[str, Any]:
    p = report.parameters
    return {
        "schemaVersion": SCHEMA_VERSION,
        "benchmark": "numa",
        "host": report.host,
        "cpuModel": report.cpu_model,
        "parameters": {
            "arrayBytes": p.array_bytes,
            "iterations": p.iterations,
            "latencySteps": p.latency_steps,
            "hugepages": p.hugepages,
            "quick": p.quick,
        },
        "cpuNodes": report.cpu_nodes,
        "memoryNodes": report.memory_nodes,
        "results": [_pair_dict(report, r) for r in report.results],
        "notes": list(report.notes),
    }


def _pair_dict(report: NumaReport, r: PairResult) -> dict[str, Any]:
    placement = r.placement
    return {
        "cpuNode": r.cpu_node,
        "memoryNode": r.memory_node,
        "cpus": str(r.cpus),
        "threads": len(r.cpus),
        "valid": r.valid,
        "reason": r.reason,
        "copyGBps": _round(r.figure("copy")),
        "triadGBps": _round(r.figure("triad")),
        "latencyNs": _round(r.figure("latency")),
        "vsLocal": {m: _round(report.vs_local(r, m), 3) for m in METRICS},
        "placement": None
        if placement is None
        else {
            "requestedNode": placement.requested_node,
            "expectedPages": placement.expected_pages,
            "pagesByNode": {str(n): pages for n, pages in placement.pages_by_node},
            "policy": placement.policy,
        },
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def numa_table(report: NumaReport) -> str:
    p = report.parameters
    lines = [
        f"dra-cpu bench numa on {report.host} ({report.cpu_model or 'unknown CPU'})",
        f"arrays {_mib(p.array_bytes)} each, {p.iterations} iteration(s), {p.latency_steps} latency steps"
        + (", 2 MiB hugepages" if p.hugepages else "")
        + (", --quick" if p.quick else ""),
        "rows: CPU node (threads bound there), columns: memory node; (x) is the figure over the row's local one",
    ]
    for metric in METRICS:
        lines += ["", METRIC_TITLES[metric], _matrix(report, metric)]
    invalid = [r for r in report.results if not r.valid]
    if invalid:
        lines += ["", "not reported (placement or run failed):"]
        lines += [f"  cpu node {r.cpu_node} -> memory node {r.memory_node}: {r.reason}" for r in invalid]
    if report.notes:
        lines += [""] + [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def _matrix(report: NumaReport, metric: str) -> str:
    header = f"{CORNER:>8}" + "".join(f"{'node ' + str(m):>18}" for m in report.memory_nodes)
    rows = [header]
    for c in report.cpu_nodes:
        cells = []
        for m in report.memory_nodes:
            r = report.result(c, m)
            cells.append(_cell(report, r, metric))
        rows.append(f"{'node ' + str(c):>8}" + "".join(f"{cell:>18}" for cell in cells))
    return "\n".join(rows)


def _cell(report: NumaReport, r: PairResult | None, metric: str) -> str:
    if r is None:
        return "-"
    value = r.figure(metric)
    if value is None:
        return "invalid"
    ratio = report.vs_local(r, metric)
    text = f"{value:.1f}" if metric == "latency" else f"{value:.2f}"
    return f"{text} ({ratio:.2f}x)" if ratio is not None else text


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


# -- isolation ---------------------------------------------------------------------------------------------------

ISOLATION_CASES = ("alone", "shared", "exclusive")


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Percentiles in microseconds over `count` samples."""

    count: int
    p50: float
    p99: float
    p999: float
    max: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "p50Us": round(self.p50, 3),
            "p99Us": round(self.p99, 3),
            "p999Us": round(self.p999, 3),
            "maxUs": round(self.max, 3),
        }


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence: a value that really occurred, as cyclictest reports."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(math.ceil(fraction * len(ordered)), 1)
    return ordered[rank - 1]


def summarize(samples_ns: Sequence[int]) -> LatencyStats:
    ordered = sorted(s / 1000 for s in samples_ns)
    return LatencyStats(
        len(ordered), percentile(ordered, 0.5), percentile(ordered, 0.99), percentile(ordered, 0.999), ordered[-1]
    )


@dataclass(frozen=True, slots=True)
class IsolationCase:
    """One way of running the probe: its CPUs, the neighbour's CPUs (empty when there is none) and the samples."""

    name: str
    probe_cpus: CPUSet
    neighbour_cpus: CPUSet
    wakeup_ns: tuple[int, ...]
    compute_ns: tuple[int, ...]

    @property
    def wakeup(self) -> LatencyStats:
        return summarize(self.wakeup_ns)

    @property
    def compute(self) -> LatencyStats:
        return summarize(self.compute_ns)


@dataclass(frozen=True, slots=True)
class IsolationReport:
    host: str
    enforcement: str
    interval_us: int
    seconds_per_case: float
    neighbour_processes: int
    cases: tuple[IsolationCase, ...]
    # 1-minute load average before and after: other processes on the machine are not confined by the bench.
    load_average: tuple[float, float] = (0.0, 0.0)
    notes: tuple[str, ...] = ()

    def case(self, name: str) -> IsolationCase:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(name)

    def p99_ratio(self, kernel: str) -> float | None:
        """shared p99 over exclusive p99: how many times worse the tail is without exclusive CPUs."""
        stats = {c.name: getattr(c, kernel) for c in self.cases}
        if "shared" not in stats or "exclusive" not in stats or stats["exclusive"].p99 <= 0:
            return None
        ratio: float = stats["shared"].p99 / stats["exclusive"].p99
        return ratio


_KERNELS = {"wakeup": "timed wake-up latency (late by), us", "compute": "fixed compute kernel duration, us"}


def isolation_report_dict(report: IsolationReport) -> dict[str, Any]:
    return {
        "schemaVersion": SCHEMA_VERSION,
        "benchmark": "isolation",
        "host": report.host,
        "enforcement": report.enforcement,
        "intervalUs": report.interval_us,
        "secondsPerCase": report.seconds_per_case,
        "neighbourProcesses": report.neighbour_processes,
        "loadAverage1m": {"before": round(report.load_average[0], 2), "after": round(report.load_average[1], 2)},
        "cases": {
            c.name: {
                "probeCpus": str(c.probe_cpus),
                "neighbourCpus": str(c.neighbour_cpus),
                "wakeup": c.wakeup.as_dict(),
                "compute": c.compute.as_dict(),
            }
            for c in report.cases
        },
        "p99SharedOverExclusive": {k: _round(report.p99_ratio(k), 3) for k in _KERNELS},
        "notes": list(report.notes),
    }


def isolation_table(report: IsolationReport) -> str:
    lines = [
        f"dra-cpu bench isolation on {report.host}: {report.seconds_per_case:g} s per case, wake-up every "
        f"{report.interval_us} us, {report.neighbour_processes} neighbour process(es), enforced by "
        f"{report.enforcement}; load average {report.load_average[0]:.2f} before, {report.load_average[1]:.2f} after",
    ]
    for c in report.cases:
        neighbour = f"neighbour on {c.neighbour_cpus}" if c.neighbour_cpus else "no neighbour"
        lines.append(f"  {c.name:<10} probe on {c.probe_cpus}, {neighbour}")
    for kernel, title in _KERNELS.items():
        lines += ["", title, f"{'case':<10}{'samples':>9}{'p50':>11}{'p99':>11}{'p99.9':>11}{'max':>11}"]
        for c in report.cases:
            s: LatencyStats = getattr(c, kernel)
            lines.append(f"{c.name:<10}{s.count:>9}{s.p50:>11.1f}{s.p99:>11.1f}{s.p999:>11.1f}{s.max:>11.1f}")
        ratio = report.p99_ratio(kernel)
        if ratio is not None:
            lines.append(f"p99 shared / exclusive: {ratio:.2f}x")
    if report.notes:
        lines += [""] + [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"
