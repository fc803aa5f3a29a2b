"""`dra-cpu bench numa`: planning and sizing on recorded topologies, and a real 1x1 run on this machine."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from dra_cpu.bench.numa import (
    MIB,
    check_fits,
    default_array_bytes,
    parse_mems_allowed,
    parse_size,
    plan_pairs,
    read_node_free_bytes,
)
from dra_cpu.cli import bench as bench_cli
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.errors import DraCpuError
from dra_cpu.node.sysfs import read_topology
from tests.harness.paths import SYSFS


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dra-cpu")
    bench_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("text", "value"),
    [("512M", 512 * MIB), ("1G", 1 << 30), ("2GiB", 2 << 30), ("4096", 4096), ("516096K", 516096 << 10)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1G", "1.5G", "12X", "G"])
def test_parse_size_rejects_with_the_field_and_value(text: str) -> None:
    with pytest.raises(DraCpuError) as err:
        parse_size(text)
    assert str(err.value) == f"--size {text!r}: expected a positive size such as 512M or 2G"


def test_mems_allowed_from_proc_status() -> None:
    assert parse_mems_allowed("Name:\tx\nMems_allowed:\t3\nMems_allowed_list:\t0-1,3\n") == CPUSet.of([0, 1, 3])
    with pytest.raises(DraCpuError, match="no Mems_allowed_list"):
        parse_mems_allowed("Name:\tx\n")


def test_plan_covers_every_pair_of_a_two_socket_machine() -> None:
    topology = read_topology(SYSFS / "dual-socket-smt2")
    pairs = plan_pairs(topology, topology.online_cpus, CPUSet.of([0, 1]))
    assert [(p.cpu_node, p.memory_node) for p in pairs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert pairs[0].cpus == CPUSet.parse("0-7") and pairs[2].cpus == CPUSet.parse("8-15")


def test_plan_keeps_to_what_a_pods_claims_allow() -> None:
    topology = read_topology(SYSFS / "dual-socket-smt2")
    # A claim for 4 CPUs on node 0 with memory on node 1: only the misaligned pair can be measured.
    pairs = plan_pairs(topology, CPUSet.parse("0-3"), CPUSet.of([1]))
    assert [(p.cpu_node, str(p.cpus), p.memory_node) for p in pairs] == [(0, "0-3", 1)]


def test_plan_includes_memory_only_nodes_as_memory_but_not_as_cpus() -> None:
    topology = read_topology(SYSFS / "cxl-memoryless")
    pairs = plan_pairs(topology, topology.online_cpus, CPUSet.of([0, 1, 2]))
    assert sorted({p.cpu_node for p in pairs}) == [0, 1]
    assert sorted({p.memory_node for p in pairs}) == [0, 1, 2]


def test_llc_and_free_memory_from_a_recorded_sysfs() -> None:
    root = SYSFS / "dual-socket-smt2"
    assert read_topology(root).l3_total_bytes == 2 * 16 * MIB  # one 16 MiB L3 per socket, counted once each
    assert read_node_free_bytes(root, 1, hugepages=False) == 403196 * 1024
    free_huge = int((root / "sys/devices/system/node/node0/hugepages/hugepages-2048kB/free_hugepages").read_text())
    assert read_node_free_bytes(root, 0, hugepages=True) == free_huge * 2 * MIB


def test_default_size_follows_streams_rule() -> None:
    assert default_array_bytes(32 * MIB, quick=False) == 256 * MIB  # 4x L3 is below the floor
    assert default_array_bytes(105 * MIB, quick=False) == 420 * MIB
    assert default_array_bytes(1 * MIB + 1, quick=False) == 256 * MIB
    assert default_array_bytes(300 * MIB, quick=True) == 64 * MIB


def test_a_size_that_does_not_fit_is_refused_before_allocating() -> None:
    check_fits(100 * MIB, {0: 300 * MIB}, hugepages=False)
    with pytest.raises(DraCpuError) as err:
        check_fits(100 * MIB, {0: 1 << 30, 1: 299 * MIB}, hugepages=True)
    assert str(err.value) == "--size 100M: needs 300 MiB of free 2 MiB hugepages on memory node 1, which has 299 MiB"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--iterations", "0"], "--iterations 0: must be at least 1"),
        (["--latency-steps", "10"], "--latency-steps 10: must be at least 1000"),
    ],
)
def test_bad_options_are_one_line_errors(argv: list[str], message: str) -> None:
    args = parse(["bench", "numa", *argv])
    with pytest.raises(DraCpuError) as err:
        args.handler(args)
    assert str(err.value) == message


def test_the_1x1_run_on_this_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allowed = CPUSet.of(os.sched_getaffinity(0))
    args = parse(
        [
            "bench",
            "numa",
            "--size",
            "16M",
            "--iterations",
            "2",
            "--latency-steps",
            "20000",
            "-o",
            "json",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert args.handler(args) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data == json.loads((tmp_path / "numa.json").read_text())
    assert data["schemaVersion"] == 1 and data["benchmark"] == "numa"
    assert data["parameters"] == {
        "arrayBytes": 16 * MIB,
        "iterations": 2,
        "latencySteps": 20000,
        "hugepages": False,
        "quick": False,
    }
    topology = read_topology("/")
    local = [r for r in data["results"] if r["cpuNode"] == r["memoryNode"]]
    assert local, "no local pair measured"
    for result in local:
        assert result["valid"] is True and result["reason"] is None
        assert CPUSet.parse(result["cpus"]).issubset(allowed)
        assert result["threads"] == len(CPUSet.parse(result["cpus"]))
        assert result["copyGBps"] > 0.1 and result["triadGBps"] > 0.1
        assert 1 < result["latencyNs"] < 100_000
        assert result["vsLocal"] == {"copy": 1.0, "triad": 1.0, "latency": 1.0}
        placement = result["placement"]
        node = str(result["memoryNode"])
        # 3 arrays of 16 MiB in 4 KiB pages, every one of them resident on the requested node and nowhere else.
        assert placement["pagesByNode"] == {node: 3 * 16 * MIB // os.sysconf("SC_PAGE_SIZE")}
        assert placement["policy"] == f"bind:{node}"
    if len(topology.numa_nodes) == 1:
        assert any("remote figures need" in note for note in data["notes"])
    assert "[1/" in err and "latency" in err  # progress went to stderr
    for metric in ("copy", "triad", "latency"):
        png = tmp_path / f"numa-{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
