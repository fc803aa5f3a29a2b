"""`dra-cpu bench isolation`: CPU splitting, cgroup discovery, and real runs on this (2-CPU) machine."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from dra_cpu.bench.isolation import IsolationOptions, run_isolation_bench, split_cpus
from dra_cpu.cli import bench as bench_cli
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.errors import DraCpuError
from dra_cpu.node.cgroups import CGROUP_ROOT, find_cpuset_hierarchy, parse_proc_cgroup

HYBRID = "9:name=systemd:/\n4:memory:/jobs/a\n3:cpuset:/jobs\n1:cpu:/\n0::/\n"
UNIFIED = "0::/kubepods.slice/pod1/cri-abc\n"
ALLOWED = CPUSet.of(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="the isolation bench needs 2 allowed CPUs")


def test_split_gives_the_probe_the_last_cpu_by_default() -> None:
    assert split_cpus(CPUSet.parse("0-3"), None) == (CPUSet.of([3]), CPUSet.parse("0-2"))
    assert split_cpus(CPUSet.parse("0-3"), CPUSet.parse("1-2")) == (CPUSet.parse("1-2"), CPUSet.parse("0,3"))


@pytest.mark.parametrize(
    ("allowed", "probe", "message"),
    [
        ("5", None, "allowed CPUs 5: the isolation bench needs at least 2"),
        ("0-1", "0-1", "--probe-cpus 0-1: leaves no CPU for the neighbour among allowed CPUs 0-1"),
        ("0-1", "2", "--probe-cpus 2: must be a non-empty subset of the allowed CPUs 0-1"),
    ],
)
def test_split_errors_name_the_field_and_value(allowed: str, probe: str | None, message: str) -> None:
    with pytest.raises(DraCpuError) as err:
        split_cpus(CPUSet.parse(allowed), CPUSet.parse(probe) if probe else None)
    assert str(err.value) == message


def test_proc_cgroup_paths_for_hybrid_and_unified_hosts() -> None:
    hybrid, unified = parse_proc_cgroup(HYBRID), parse_proc_cgroup(UNIFIED)
    assert (hybrid["cpuset"], hybrid[""]) == ("/jobs", "/")
    assert "cpuset" not in unified and unified[""] == "/kubepods.slice/pod1/cri-abc"


def test_hierarchy_prefers_v2_when_cpuset_is_a_v2_controller(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "kubepods.slice/pod1/cri-abc").mkdir(parents=True)
    found = find_cpuset_hierarchy(tmp_path, UNIFIED)
    assert found is not None and found.version == 2
    assert found.parent == tmp_path / "kubepods.slice/pod1/cri-abc"


def test_hierarchy_uses_v1_cpuset_on_hybrid_hosts(tmp_path: Path) -> None:
    (tmp_path / "unified").mkdir()
    (tmp_path / "cpuset/jobs").mkdir(parents=True)
    (tmp_path / "cpuset/cpuset.cpus").write_text("0-1\n")
    found = find_cpuset_hierarchy(tmp_path, HYBRID)
    assert found is not None and (found.version, found.parent) == (1, tmp_path / "cpuset/jobs")
    assert found.name == "cgroup-v1"


def test_no_hierarchy_without_a_cpuset_controller(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert find_cpuset_hierarchy(tmp_path, UNIFIED) is None


def _leftovers() -> list[str]:
    places = [CGROUP_ROOT / "cpuset", CGROUP_ROOT]
    return [p.name for place in places if place.is_dir() for p in place.iterdir() if p.name.startswith("dra-cpu-bench")]


@needs_two_cpus
@pytest.mark.parametrize("enforce", ["auto", "affinity"])
def test_the_three_cases_run_on_this_machine(enforce: str) -> None:
    report = run_isolation_bench(IsolationOptions(None, 0.4, 1000, enforce), lambda _: None)
    assert [c.name for c in report.cases] == ["alone", "shared", "exclusive"]
    probe = CPUSet.of([ALLOWED.sorted()[-1]])
    alone, shared, exclusive = report.cases
    assert (alone.probe_cpus, alone.neighbour_cpus) == (probe, CPUSet())
    assert (shared.probe_cpus, shared.neighbour_cpus) == (probe, ALLOWED)
    assert (exclusive.probe_cpus, exclusive.neighbour_cpus) == (probe, ALLOWED - probe)
    for case in report.cases:
        # A 1 ms period over 0.4 s: some wake-ups, all late by a non-negative amount, each with a compute sample.
        assert 10 <= len(case.wakeup_ns) <= 400 and len(case.compute_ns) == len(case.wakeup_ns)
        assert min(case.wakeup_ns) >= 0 and min(case.compute_ns) > 0
    if enforce == "affinity":
        assert report.enforcement == "sched_setaffinity"
    elif os.geteuid() == 0 and (CGROUP_ROOT / "cpuset/cpuset.cpus").exists():
        assert report.enforcement == "cgroup-v1"
    assert report.neighbour_processes == len(ALLOWED)
    assert _leftovers() == []


@needs_two_cpus
def test_cli_writes_the_report_and_cdf_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="dra-cpu")
    bench_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["bench", "isolation", "--seconds", "0.3", "--enforce", "affinity", "--output-dir", str(tmp_path)]
    )
    assert args.handler(args) == 0
    table = capsys.readouterr().out
    assert "p99 shared / exclusive:" in table
    data = json.loads((tmp_path / "isolation.json").read_text())
    assert list(data["cases"]) == ["alone", "shared", "exclusive"]
    assert set(data["cases"]["shared"]["wakeup"]) == {"count", "p50Us", "p99Us", "p999Us", "maxUs"}
    assert set(data["p99SharedOverExclusive"]) == {"wakeup", "compute"}
    for kernel in ("wakeup", "compute"):
        assert (tmp_path / f"isolation-{kernel}-cdf.png").read_bytes()[:4] == b"\x89PNG"


@needs_two_cpus
def test_cgroup_enforcement_refused_where_impossible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dra_cpu.bench.isolation.CGROUP_ROOT", Path("/nonexistent"))
    with pytest.raises(DraCpuError, match="--enforce cgroup: no writable cpuset cgroup hierarchy"):
        run_isolation_bench(IsolationOptions(CPUSet.of([ALLOWED.sorted()[-1]]), 0.1, 1000, "cgroup"), print)
