"""Tables, JSON and statistics of the benchmarks, from hand-made results (no measuring)."""

from __future__ import annotations

import pytest

from dra_cpu.bench.numa_maps import Placement
from dra_cpu.bench.report import (
    IsolationCase,
    IsolationReport,
    NumaParameters,
    NumaReport,
    PairResult,
    isolation_report_dict,
    isolation_table,
    numa_report_dict,
    numa_table,
    percentile,
    summarize,
)
from dra_cpu.core.cpuset import CPUSet

PARAMS = NumaParameters(1 << 30, 5, 1_000_000, False, False)


def pair(cpu: int, mem: int, copy: float, latency: float, on: int | None = None) -> PairResult:
    placement = Placement(mem, 100, ((mem if on is None else on, 100),), f"bind:{mem}")
    return PairResult(cpu, mem, CPUSet.of([cpu * 4]), placement, copy, copy * 1.1, latency)


def two_by_two() -> NumaReport:
    return NumaReport(
        "node-a",
        "Xeon",
        PARAMS,
        (
            pair(0, 0, 20.0, 80.0),
            pair(0, 1, 10.0, 140.0),
            pair(1, 0, 8.0, 150.0, on=1),  # pages landed on the wrong node
            pair(1, 1, 16.0, 90.0),
        ),
    )


def test_ratios_are_against_the_rows_local_figure() -> None:
    report = two_by_two()
    remote = report.result(0, 1)
    assert remote is not None
    assert report.vs_local(remote, "copy") == pytest.approx(0.5)
    assert report.vs_local(remote, "latency") == pytest.approx(1.75)
    misplaced = report.result(1, 0)
    assert misplaced is not None and report.vs_local(misplaced, "copy") is None


def test_invalid_pairs_are_never_printed_as_numbers() -> None:
    report = two_by_two()
    data = numa_report_dict(report)
    bad = next(r for r in data["results"] if (r["cpuNode"], r["memoryNode"]) == (1, 0))
    assert bad["valid"] is False
    assert (bad["copyGBps"], bad["triadGBps"], bad["latencyNs"]) == (None, None, None)
    assert bad["reason"] == "100 of 100 pages are on node 1, not on requested node 0"
    assert bad["placement"] == {"requestedNode": 0, "expectedPages": 100, "pagesByNode": {"1": 100}, "policy": "bind:0"}
    table = numa_table(report)
    assert "150.0" not in table and "8.00" not in table
    assert "cpu node 1 -> memory node 0: 100 of 100 pages are on node 1" in table


def test_table_shows_the_matrix_with_ratios() -> None:
    table = numa_table(two_by_two())
    copy_block = table.split("copy bandwidth, GB/s\n")[1].split("\n\n")[0].splitlines()
    assert copy_block[1].split() == ["node", "0", "20.00", "(1.00x)", "10.00", "(0.50x)"]
    assert copy_block[2].split() == ["node", "1", "invalid", "16.00", "(1.00x)"]


def test_json_has_the_documented_top_level_fields() -> None:
    data = numa_report_dict(two_by_two())
    assert set(data) == {
        "schemaVersion",
        "benchmark",
        "host",
        "cpuModel",
        "parameters",
        "cpuNodes",
        "memoryNodes",
        "results",
        "notes",
    }
    assert data["cpuNodes"] == [0, 1] and data["memoryNodes"] == [0, 1]
    assert data["results"][1]["vsLocal"] == {"copy": 0.5, "triad": 0.5, "latency": 1.75}


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(v) for v in range(1, 1001)]
    assert percentile(ordered, 0.5) == 500
    assert percentile(ordered, 0.99) == 990
    assert percentile(ordered, 0.999) == 999
    assert percentile([7.0], 0.999) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_summarize_converts_ns_to_us() -> None:
    stats = summarize([1000] * 99 + [50_000])
    assert (stats.count, stats.p50, stats.p99, stats.max) == (100, 1.0, 1.0, 50.0)


def isolation() -> IsolationReport:
    def case(name: str, shift: int) -> IsolationCase:
        samples = tuple(range(1000, 1000 + 1000 * shift, shift))
        return IsolationCase(name, CPUSet.of([1]), CPUSet.of([0]) if name != "alone" else CPUSet(), samples, samples)

    return IsolationReport("n", "cgroup-v1", 1000, 2.0, 2, (case("alone", 1), case("shared", 40), case("exclusive", 2)))


def test_isolation_report_has_three_cases_and_the_p99_ratio() -> None:
    report = isolation()
    data = isolation_report_dict(report)
    assert list(data["cases"]) == ["alone", "shared", "exclusive"]
    assert data["cases"]["exclusive"]["wakeup"]["p99Us"] == pytest.approx((1000 + 989 * 2) / 1000)
    ratio = report.case("shared").wakeup.p99 / report.case("exclusive").wakeup.p99
    assert data["p99SharedOverExclusive"]["wakeup"] == round(ratio, 3)
    assert ratio > 10
    assert f"p99 shared / exclusive: {ratio:.2f}x" in isolation_table(report)
