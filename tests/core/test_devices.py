from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from dra_cpu.cli import main
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import (
    DeviceConfig,
    DeviceConfigError,
    DeviceMode,
    build_devices,
    build_slices,
)
from dra_cpu.node.sysfs import read_topology
from tests.support.paths import SYSFS
from tests.support.synthetic import SyntheticCpu, SyntheticNode, uniform_machine, write_tree

FIXTURES = SYSFS


def _slices(root: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    assert main(["slices", "--sysfs-root", str(root), "--node-name", "node-a", "--output", "json", *extra]) == 0
    items: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["items"]
    return items


def _devices(slices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for s in slices for d in s["spec"]["devices"]}


@pytest.mark.parametrize("mode", ["grouped", "individual"])
@pytest.mark.parametrize("version", ["1.34.0", "1.37.0"])
def test_every_fixture_validates_strictly(
    sysfs_fixture: Path, mode: str, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for obj in _slices(sysfs_fixture, "--device-mode", mode, capsys=capsys):
        kubernetes_validate.validate(obj, version, strict=True)
        assert len(obj["spec"]["devices"]) <= 128


def test_grouped_dual_socket(capsys: pytest.CaptureFixture[str]) -> None:
    devices = _devices(_slices(FIXTURES / "dual-socket-smt2", capsys=capsys))
    assert sorted(devices) == ["cpu-numa0", "cpu-numa1", "hugepages-2mi-numa0", "hugepages-2mi-numa1"]
    cpu0 = devices["cpu-numa0"]
    assert cpu0["allowMultipleAllocations"] is True
    assert cpu0["capacity"]["dra.cpu/cpu"] == {
        "value": "8",
        "requestPolicy": {"default": "1", "validRange": {"min": "1", "max": "8", "step": "1"}},
    }
    attrs = cpu0["attributes"]
    assert attrs["resource.kubernetes.io/numaNode"] == {"int": 0}
    assert attrs["dra.cpu/numaNodeID"] == {"int": 0}
    assert attrs["dra.net/numaNode"] == {"int": 0}
    assert attrs["dra.cpu/type"] == {"string": "cpu"}
    assert attrs["dra.cpu/smtEnabled"] == {"bool": True}
    assert attrs["dra.cpu/threadsPerCore"] == {"int": 2}
    assert attrs["dra.cpu/isolated"] == {"bool": False}
    assert devices["cpu-numa1"]["attributes"]["dra.cpu/socketID"] == {"int": 1}
    huge = devices["hugepages-2mi-numa0"]
    assert huge["attributes"]["dra.cpu/pageSize"] == {"string": "2Mi"}
    assert huge["attributes"]["dra.cpu/type"] == {"string": "hugepages"}
    assert huge["capacity"]["dra.cpu/memory"] == {
        "value": "128Mi",
        "requestPolicy": {"default": "2Mi", "validRange": {"min": "2Mi", "max": "128Mi", "step": "2Mi"}},
    }
    assert devices["hugepages-2mi-numa1"]["capacity"]["dra.cpu/memory"]["value"] == "64Mi"


def test_reserved_cpus_and_whole_cores(capsys: pytest.CaptureFixture[str]) -> None:
    root = FIXTURES / "dual-socket-smt2"
    devices = _devices(_slices(root, "--reserved-cpus", "0", capsys=capsys))
    assert devices["cpu-numa0"]["capacity"]["dra.cpu/cpu"]["value"] == "7"
    devices = _devices(_slices(root, "--reserved-cpus", "0", "--whole-cores", capsys=capsys))
    policy = devices["cpu-numa0"]["capacity"]["dra.cpu/cpu"]
    assert policy["value"] == "6", "CPU 1 is a lone sibling of reserved CPU 0: it stays in the shared pool"
    assert policy["requestPolicy"]["validRange"] == {"min": "2", "max": "6", "step": "2"}
    assert policy["requestPolicy"]["default"] == "2"


def test_multi_l3_counts_groups(capsys: pytest.CaptureFixture[str]) -> None:
    devices = _devices(_slices(FIXTURES / "multi-l3-per-node", capsys=capsys))
    assert devices["cpu-numa0"]["attributes"]["dra.cpu/l3Caches"] == {"int": 2}


def test_isolated_cpus_get_their_own_devices(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=2, cores_per_node=4, threads=1)
    write_tree(tmp_path, cpus, nodes, isolated=CPUSet.parse("2-3,6"))
    devices = {d.name: d for d in build_devices(read_topology(tmp_path), DeviceConfig(node_name="n"))}
    assert str(devices["cpu-numa0"].cpus) == "0-1"
    assert str(devices["cpu-isolated-numa0"].cpus) == "2-3"
    assert str(devices["cpu-isolated-numa1"].cpus) == "6"
    assert dict(devices["cpu-isolated-numa1"].attributes)["dra.cpu/isolated"] is True
    assert str(devices["cpu-numa1"].cpus) == "4-5,7"


def test_memory_only_node_gets_hugepages_but_no_cpus(tmp_path: Path) -> None:
    cpus = [SyntheticCpu(id=i, core=i) for i in range(2)]
    nodes = [
        SyntheticNode(id=0, cpus=CPUSet.parse("0-1")),
        SyntheticNode(id=1, cpus=CPUSet(), hugepages={1048576: (2, 2), 2048: (0, 0)}),
    ]
    write_tree(tmp_path, cpus, nodes)
    devices = {d.name: d for d in build_devices(read_topology(tmp_path), DeviceConfig(node_name="n"))}
    assert sorted(devices) == ["cpu-numa0", "hugepages-1gi-numa1"]
    huge = devices["hugepages-1gi-numa1"].to_api()
    assert huge["attributes"]["dra.cpu/memoryOnly"] == {"bool": True}
    assert huge["capacity"]["dra.cpu/memory"]["value"] == "2Gi"


def test_individual_mode_names_are_cpu_ids(capsys: pytest.CaptureFixture[str]) -> None:
    devices = _devices(
        _slices(FIXTURES / "big-8numa", "--device-mode", "individual", "--reserved-cpus", "0-3", capsys=capsys)
    )
    assert len(devices) == 60 and "cpu-3" not in devices
    cpu9 = devices["cpu-9"]
    assert "capacity" not in cpu9 and "allowMultipleAllocations" not in cpu9
    assert cpu9["attributes"]["dra.cpu/cpuID"] == {"int": 9}
    assert cpu9["attributes"]["resource.kubernetes.io/numaNode"] == {"int": 1}
    assert cpu9["attributes"]["dra.cpu/l3CacheID"] == {"int": 0}


def test_many_devices_spread_over_slices(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=2, cores_per_node=80, threads=1)
    write_tree(tmp_path, cpus, nodes)
    config = DeviceConfig(node_name="big", device_mode=DeviceMode.INDIVIDUAL)
    slices = build_slices(build_devices(read_topology(tmp_path), config), config, generation=3)
    assert [len(s["spec"]["devices"]) for s in slices] == [128, 128, 64]
    assert {s["spec"]["pool"]["resourceSliceCount"] for s in slices} == {3}
    assert {s["spec"]["pool"]["generation"] for s in slices} == {3}
    assert len({s["metadata"]["name"] for s in slices}) == 3
    for obj in slices:
        kubernetes_validate.validate(obj, "1.34.0", strict=True)


def test_deterministic() -> None:
    topo = read_topology(FIXTURES / "snc-4numa")
    config = DeviceConfig(node_name="n")
    assert build_slices(build_devices(topo, config), config) == build_slices(build_devices(topo, config), config)


def test_long_strings_are_cut_to_the_api_limit(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=1, cores_per_node=2, threads=1)
    write_tree(tmp_path, cpus, nodes, model="X" * 100)
    device = build_devices(read_topology(tmp_path), DeviceConfig(node_name="n"))[0].to_api()
    assert device["attributes"]["dra.cpu/cpuModel"] == {"string": "X" * 64}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reserved-cpus", "0-15"], "no allocatable CPUs: online 0-15, reserved 0-15"),
        (["--reserved-cpus", "16-17"], "CPU(s) 16-17 do not exist on this node"),
        (["--reserved-cpus", "two"], "--reserved-cpus 'two': invalid cpu id 'two'"),
        (["--driver-name", "DRA_CPU"], "invalid driver name 'DRA_CPU'"),
    ],
)
def test_bad_settings_are_one_clear_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = FIXTURES / "dual-socket-smt2"
    assert main(["slices", "--sysfs-root", str(root), "--node-name", "node-a", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_invalid_node_name() -> None:
    with pytest.raises(DeviceConfigError, match="invalid node name 'Node_1'"):
        DeviceConfig(node_name="Node_1")
