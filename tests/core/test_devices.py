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
    GroupBy,
    build_devices,
    build_slices,
)
from dra_cpu.node.sysfs import read_topology
from tests.harness.paths import SYSFS
from tests.harness.synthetic_sysfs import (
    ONE_STEP_CASES,
    SyntheticCpu,
    SyntheticNode,
    one_step_machine,
    uniform_machine,
    write_pcie_root,
    write_tree,
)

FIXTURES = SYSFS


def _slices(root: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    assert main(["slices", "--sysfs-root", str(root), "--node-name", "node-a", "--output", "json", *extra]) == 0
    items: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["items"]
    return items


def _devices(slices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for s in slices for d in s["spec"]["devices"]}


MODES = {
    "numanode": ("--group-by", "numanode"),
    "socket": ("--group-by", "socket"),
    "machine": ("--group-by", "machine"),
    "individual": ("--device-mode", "individual"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("mapped", [False, True], ids=["unmapped", "mapped"])
def test_every_fixture_validates_strictly(
    sysfs_fixture: Path, mode: str, mapped: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """1.34 and 1.37 accept every slice without nodeAllocatableResources; 1.37 accepts them with it, and 1.34 (which
    does not know the field) refuses exactly that field."""
    args = (*MODES[mode], *(("--publish-node-allocatable-resources",) if mapped else ()))
    for obj in _slices(sysfs_fixture, *args, capsys=capsys):
        assert len(obj["spec"]["devices"]) <= 128
        kubernetes_validate.validate(obj, "1.37.0", strict=True)
        mappings = [d.get("nodeAllocatableResources") for d in obj["spec"]["devices"]]
        assert all(mappings) if mapped else not any(mappings)
        if mapped:
            with pytest.raises(kubernetes_validate.ValidationError, match="nodeAllocatableResources"):
                kubernetes_validate.validate(obj, "1.34.0", strict=True)
            for device in obj["spec"]["devices"]:
                del device["nodeAllocatableResources"]
        kubernetes_validate.validate(obj, "1.34.0", strict=True)


PCIE_ROOT = "resource.kubernetes.io/pcieRoot"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pcie_roots_validate_for_1_37_and_are_absent_without_the_option(
    sysfs_fixture: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --publish-pcie-roots 1.37 accepts every slice strictly; 1.34 (which has no list attributes) refuses
    exactly `strings`. Without the option no device has the attribute (1.34 slices, as before)."""
    plain = _slices(sysfs_fixture, *MODES[mode], capsys=capsys)
    assert not any(PCIE_ROOT in d["attributes"] for s in plain for d in s["spec"]["devices"])
    for obj in _slices(sysfs_fixture, *MODES[mode], "--publish-pcie-roots", capsys=capsys):
        devices = obj["spec"]["devices"]
        lists = [d["attributes"][PCIE_ROOT] for d in devices if PCIE_ROOT in d["attributes"]]
        assert len(devices) <= (64 if lists else 128)
        kubernetes_validate.validate(obj, "1.37.0", strict=True)
        assert all(set(value) == {"strings"} and value["strings"] for value in lists)
        if lists:
            with pytest.raises(kubernetes_validate.ValidationError, match="'strings' was unexpected"):
                kubernetes_validate.validate(obj, "1.34.0", strict=True)


def test_pcie_roots_of_the_expander_capture(capsys: pytest.CaptureFixture[str]) -> None:
    """Each CPU device lists the roots on its NUMA node and pci0000:00 (no NUMA node: local to every CPU); the root of
    memory-only node 2 is on no CPU device; hugepage devices carry none."""
    root = FIXTURES / "pcie-expander-3numa"
    want = {
        "numanode": {"cpu-numa0": ["pci0000:00", "pci0000:10"], "cpu-numa1": ["pci0000:00", "pci0000:20"]},
        "socket": {"cpu-socket0": ["pci0000:00", "pci0000:10"], "cpu-socket1": ["pci0000:00", "pci0000:20"]},
        "machine": {"cpu-machine": ["pci0000:00", "pci0000:10", "pci0000:20"]},
        # CPU 0 is held back for the shared pool (minSharedCpus 1): no device.
        "individual": {f"cpu-{i}": ["pci0000:00", "pci0000:10" if i < 4 else "pci0000:20"] for i in range(1, 8)},
    }
    for mode, expected in want.items():
        devices = _devices(_slices(root, *MODES[mode], "--publish-pcie-roots", capsys=capsys))
        got = {
            name: d["attributes"][PCIE_ROOT]["strings"] for name, d in devices.items() if PCIE_ROOT in d["attributes"]
        }
        assert got == expected, mode
        assert all(not name.startswith("hugepages") for name in got)


def test_a_cpu_device_without_local_roots_has_no_attribute(tmp_path: Path) -> None:
    """A list attribute must not be empty: node 1 here has no root of its own and none without a node."""
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=1, cores_per_node=2, threads=1)
    write_tree(tmp_path, cpus, nodes)
    write_pcie_root(tmp_path, "pci0000:00", {"0000:00:00.0": 0})
    config = DeviceConfig(node_name="n", pcie_roots=True)
    devices = {d.name: dict(d.attributes) for d in build_devices(read_topology(tmp_path, pcie_roots=True), config)}
    assert devices["cpu-numa0"][PCIE_ROOT] == ("pci0000:00",)
    assert PCIE_ROOT not in devices["cpu-numa1"]


def test_too_many_roots_for_one_device_is_one_clear_error(tmp_path: Path) -> None:
    """48 attribute values per device: the machine device of a machine with 44 roots cannot list them all beside its
    five scalar attributes."""
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=1, cores_per_node=2, threads=1)
    write_tree(tmp_path, cpus, nodes)
    for bus in range(44):
        write_pcie_root(tmp_path, f"pci0000:{bus * 4:02x}", {f"0000:{bus * 4:02x}:00.0": bus % 2})
    topology = read_topology(tmp_path, pcie_roots=True)
    numa = build_devices(topology, DeviceConfig(node_name="n", pcie_roots=True))
    roots = [value for d in numa for key, value in d.attributes if key == PCIE_ROOT]
    assert [len(value) for value in roots if isinstance(value, tuple)] == [22, 22]
    with pytest.raises(DeviceConfigError, match=r"^device cpu-machine would carry 49 attribute values, above the 48"):
        build_devices(topology, DeviceConfig(node_name="n", pcie_roots=True, group_by=GroupBy.MACHINE))


def test_list_attributes_cut_slices_to_64_devices(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=1, cores_per_node=100, threads=1)
    write_tree(tmp_path, cpus, nodes)
    write_pcie_root(tmp_path, "pci0000:00", {"0000:00:00.0": 0})
    topology = read_topology(tmp_path, pcie_roots=True)
    # 99 CPU devices (CPU 0 stays shared: minSharedCpus 1) and the node's memory.
    for pcie, sizes in ((False, [100]), (True, [64, 36])):
        config = DeviceConfig(node_name="n", device_mode=DeviceMode.INDIVIDUAL, pcie_roots=pcie)
        slices = build_slices(build_devices(topology, config), config)
        assert [len(s["spec"]["devices"]) for s in slices] == sizes
        for obj in slices:
            kubernetes_validate.validate(obj, "1.37.0", strict=True)


def test_grouped_dual_socket(capsys: pytest.CaptureFixture[str]) -> None:
    devices = _devices(_slices(FIXTURES / "dual-socket-smt2", capsys=capsys))
    assert sorted(devices) == [
        "cpu-numa0",
        "cpu-numa1",
        "hugepages-2mi-numa0",
        "hugepages-2mi-numa1",
        "memory-numa0",
        "memory-numa1",
    ]
    cpu0 = devices["cpu-numa0"]
    assert cpu0["allowMultipleAllocations"] is True
    # 7 of node 0's 8 CPUs: CPU 0 is held back so that containers without claims keep one (minSharedCpus 1).
    assert cpu0["capacity"]["dra.cpu/cpu"] == {
        "value": "7",
        "requestPolicy": {"default": "1", "validRange": {"min": "1", "step": "1"}},
    }
    assert devices["cpu-numa1"]["capacity"]["dra.cpu/cpu"]["value"] == "8"
    attrs = cpu0["attributes"]
    assert attrs["resource.kubernetes.io/numaNode"] == {"int": 0}
    assert attrs["dra.cpu/numaNodeID"] == {"int": 0}
    assert attrs["dra.net/numaNode"] == {"int": 0}
    assert attrs["dra.cpu/type"] == {"string": "cpu"}
    assert attrs["dra.cpu/smtEnabled"] == {"bool": True}
    assert "dra.cpu/isolated" not in attrs, "only isolated CPUs' devices say so"
    assert devices["cpu-numa1"]["attributes"]["dra.cpu/socketID"] == {"int": 1}
    huge = devices["hugepages-2mi-numa0"]
    assert huge["attributes"]["dra.cpu/pageSize"] == {"string": "2Mi"}
    assert huge["attributes"]["dra.cpu/type"] == {"string": "hugepages"}
    assert huge["capacity"]["dra.cpu/memory"] == {
        "value": "128Mi",
        "requestPolicy": {"default": "2Mi", "validRange": {"min": "2Mi", "step": "2Mi"}},
    }
    assert devices["hugepages-2mi-numa1"]["capacity"]["dra.cpu/memory"]["value"] == "64Mi"


def test_reserved_cpus_and_whole_cores(capsys: pytest.CaptureFixture[str]) -> None:
    root = FIXTURES / "dual-socket-smt2"
    devices = _devices(_slices(root, "--reserved-cpus", "0", capsys=capsys))
    assert devices["cpu-numa0"]["capacity"]["dra.cpu/cpu"]["value"] == "7"
    devices = _devices(_slices(root, "--reserved-cpus", "0", "--whole-cores", capsys=capsys))
    policy = devices["cpu-numa0"]["capacity"]["dra.cpu/cpu"]
    assert policy["value"] == "6", "CPU 1 is a lone sibling of reserved CPU 0: it stays in the shared pool"
    assert policy["requestPolicy"]["validRange"] == {"min": "2", "step": "2"}
    assert policy["requestPolicy"]["default"] == "2"


def test_isolated_cpus_get_their_own_devices(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=2, cores_per_node=4, threads=1)
    write_tree(tmp_path, cpus, nodes, isolated=CPUSet.parse("2-3,6"))
    devices = {d.name: d for d in build_devices(read_topology(tmp_path), DeviceConfig(node_name="n"))}
    # CPU 0 stays shared (minSharedCpus 1); the isolated CPUs are never shared, so none of them is held back.
    assert str(devices["cpu-numa0"].cpus) == "1"
    assert str(devices["cpu-isolated-numa0"].cpus) == "2-3"
    assert str(devices["cpu-isolated-numa1"].cpus) == "6"
    assert dict(devices["cpu-isolated-numa1"].attributes)["dra.cpu/isolated"] is True
    assert str(devices["cpu-numa1"].cpus) == "4-5,7"


@pytest.mark.parametrize("case", sorted(ONE_STEP_CASES))
def test_a_device_of_one_step_has_no_step(tmp_path: Path, case: str) -> None:
    """Kubernetes refuses a validRange whose min + step exceeds the capacity: such a device has one valid amount."""
    isolated, whole_cores = ONE_STEP_CASES[case]
    topology = read_topology(one_step_machine(tmp_path, isolated))
    # No CPU held back for the shared pool, so that node 0 keeps two steps.
    config = DeviceConfig(node_name="n", whole_cores=whole_cores, min_shared_cpus=0)
    devices = {d.name: d.to_api() for d in build_devices(topology, config)}
    one = "2" if whole_cores else "1"
    assert devices["cpu-isolated-numa1"]["capacity"]["dra.cpu/cpu"] == {
        "value": one,
        "requestPolicy": {"default": one, "validRange": {"min": one}},
    }
    assert devices["hugepages-1gi-numa0"]["capacity"]["dra.cpu/memory"]["requestPolicy"] == {
        "default": "1Gi",
        "validRange": {"min": "1Gi"},
    }
    # Devices of more than one step keep theirs.
    assert devices["cpu-numa0"]["capacity"]["dra.cpu/cpu"]["requestPolicy"]["validRange"]["step"] == one


def test_memory_only_node_gets_hugepages_but_no_cpus(tmp_path: Path) -> None:
    cpus = [SyntheticCpu(id=i, core=i) for i in range(2)]
    nodes = [
        SyntheticNode(id=0, cpus=CPUSet.parse("0-1")),
        SyntheticNode(id=1, cpus=CPUSet(), hugepages={1048576: (2, 2), 2048: (0, 0)}),
    ]
    write_tree(tmp_path, cpus, nodes)
    devices = {d.name: d for d in build_devices(read_topology(tmp_path), DeviceConfig(node_name="n"))}
    # Node 1's memory is all in its two 1 GiB pages: no memory device.
    assert sorted(devices) == ["cpu-numa0", "hugepages-1gi-numa1", "memory-numa0"]
    huge = devices["hugepages-1gi-numa1"].to_api()
    assert huge["attributes"]["dra.cpu/memoryOnly"] == {"bool": True}
    assert huge["capacity"]["dra.cpu/memory"]["value"] == "2Gi"


def test_individual_mode_names_are_cpu_ids(capsys: pytest.CaptureFixture[str]) -> None:
    devices = _devices(
        _slices(FIXTURES / "big-8numa", "--device-mode", "individual", "--reserved-cpus", "0-3", capsys=capsys)
    )
    assert len([d for d in devices if d.startswith("cpu-")]) == 60 and "cpu-3" not in devices
    assert [d for d in devices if not d.startswith("cpu-")] == [f"memory-numa{n}" for n in range(8)]
    cpu9 = devices["cpu-9"]
    assert "capacity" not in cpu9 and "allowMultipleAllocations" not in cpu9
    assert cpu9["attributes"]["dra.cpu/cpuID"] == {"int": 9}
    assert cpu9["attributes"]["resource.kubernetes.io/numaNode"] == {"int": 1}
    assert cpu9["attributes"]["dra.cpu/cacheL3ID"] == {"int": 0}
    assert "dra.cpu/l3CacheID" not in cpu9["attributes"], "the upstream name only"


def test_many_devices_spread_over_slices(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=2, cores_per_node=80, threads=1)
    write_tree(tmp_path, cpus, nodes)
    config = DeviceConfig(node_name="big", device_mode=DeviceMode.INDIVIDUAL)
    slices = build_slices(build_devices(read_topology(tmp_path), config), config, generation=3)
    # 319 CPUs (CPU 0 stays shared) and each NUMA node's memory.
    assert [len(s["spec"]["devices"]) for s in slices] == [128, 128, 67]
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
    """The machine device of 60 one-CPU NUMA nodes whose odd ones are reserved: its NUMA node list is longer than a
    string attribute may be."""
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=60, cores_per_node=1, threads=1)
    write_tree(tmp_path, cpus, nodes)
    odd = CPUSet.of(range(1, 60, 2))
    config = DeviceConfig(node_name="n", group_by=GroupBy.MACHINE, reserved_cpus=odd)
    device = build_devices(read_topology(tmp_path), config)[0].to_api()
    assert device["attributes"]["dra.cpu/numaNodes"] == {"string": str(CPUSet.of(range(0, 60, 2)))[:64]}
    assert len(str(CPUSet.of(range(0, 60, 2)))) > 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reserved-cpus", "0-15"], "no CPU is left for claims (online 0-15, isolated none, reservedCpus 0-15)"),
        (["--reserved-cpus", "16-17"], "reservedCpus 16-17: CPU(s) 16-17 do not exist on this node (present: 0-15)"),
        (
            ["--min-shared-cpus", "16"],
            "minSharedCpus 16: this node has 16 CPU(s) to share (online 0-15, isolated none, reservedCpus none); "
            "keeping 16 for containers without claims leaves no CPU outside isolcpus for claims",
        ),
        (
            ["--reserved-cpus", "0-13", "--strict-reserved", "--min-shared-cpus", "3"],
            "minSharedCpus 3: this node has 2 CPU(s) to share (online 0-15, isolated none, reservedCpus 0-13 with "
            "strictReserved)",
        ),
        (["--reserved-cpus", "two"], "reservedCpus 'two': invalid cpu id 'two'"),
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


def test_node_allocatable_mappings(capsys: pytest.CaptureFixture[str]) -> None:
    """KEP-5517: grouped CPU devices map consumed dra.cpu/cpu 1:1 to cpu, hugepage devices their bytes to
    hugepages-<size>, memory devices theirs to memory, individual CPU devices one cpu each; nothing is published
    unless asked."""
    root = FIXTURES / "dual-socket-smt2"
    assert not any("nodeAllocatableResources" in d for d in _devices(_slices(root, capsys=capsys)).values())
    devices = _devices(_slices(root, "--publish-node-allocatable-resources", capsys=capsys))
    cpu_map = {"cpu": {"mapping": {"capacityKey": "dra.cpu/cpu", "capacityMultiplier": "1"}}}
    assert devices["cpu-numa0"]["nodeAllocatableResources"] == cpu_map
    assert devices["cpu-numa1"]["nodeAllocatableResources"] == cpu_map
    assert devices["hugepages-2mi-numa0"]["nodeAllocatableResources"] == {
        "hugepages-2Mi": {"mapping": {"capacityKey": "dra.cpu/memory", "capacityMultiplier": "1"}}
    }
    # The scheduler charges a claim's memory against the Node's allocatable memory: pods need not repeat it.
    for node in (0, 1):
        assert devices[f"memory-numa{node}"]["nodeAllocatableResources"] == {
            "memory": {"mapping": {"capacityKey": "dra.cpu/memory", "capacityMultiplier": "1"}}
        }
    individual = _devices(
        _slices(root, "--device-mode", "individual", "--publish-node-allocatable-resources", capsys=capsys)
    )
    assert individual["cpu-5"]["nodeAllocatableResources"] == {"cpu": {"mapping": {"deviceMultiplier": "1"}}}
    assert individual["hugepages-2mi-numa1"]["nodeAllocatableResources"] == {
        "hugepages-2Mi": {"mapping": {"capacityKey": "dra.cpu/memory", "capacityMultiplier": "1"}}
    }


def test_one_gigabyte_pages_map_to_hugepages_1gi(tmp_path: Path) -> None:
    cpus = [SyntheticCpu(id=i, core=i) for i in range(2)]
    write_tree(tmp_path, cpus, [SyntheticNode(id=0, cpus=CPUSet.parse("0-1"), hugepages={1048576: (2, 2)})])
    config = DeviceConfig(node_name="n", node_allocatable=True)
    devices = {d.name: d.to_api() for d in build_devices(read_topology(tmp_path), config)}
    assert devices["hugepages-1gi-numa0"]["nodeAllocatableResources"] == {
        "hugepages-1Gi": {"mapping": {"capacityKey": "dra.cpu/memory", "capacityMultiplier": "1"}}
    }
    assert devices["cpu-numa0"]["nodeAllocatableResources"]["cpu"]["mapping"]["capacityKey"] == "dra.cpu/cpu"


def test_group_by_socket(capsys: pytest.CaptureFixture[str]) -> None:
    """big-8numa: 4 sockets of 2 NUMA nodes each. A socket device spans two NUMA nodes, so it carries no NUMA
    attribute (one int cannot say 0 and 1) but says which nodes it covers."""
    devices = _devices(_slices(FIXTURES / "big-8numa", "--group-by", "socket", "--reserved-cpus", "0-1", capsys=capsys))
    assert sorted(devices) == ["cpu-socket0", "cpu-socket1", "cpu-socket2", "cpu-socket3"] + [
        f"memory-numa{n}" for n in range(8)
    ]
    socket0 = devices["cpu-socket0"]
    assert socket0["capacity"]["dra.cpu/cpu"]["value"] == "14"
    assert socket0["allowMultipleAllocations"] is True
    assert socket0["attributes"] == {
        "dra.cpu/type": {"string": "cpu"},
        "dra.cpu/numaNodes": {"string": "0-1"},
        "dra.cpu/numaNodeCount": {"int": 2},
        "dra.cpu/socketID": {"int": 0},
        "dra.cpu/numCPUs": {"int": 14},
        "dra.cpu/smtEnabled": {"bool": True},
    }
    assert devices["cpu-socket3"]["attributes"]["dra.cpu/numaNodes"] == {"string": "6-7"}


def test_group_by_socket_with_one_numa_node_keeps_the_numa_attributes(capsys: pytest.CaptureFixture[str]) -> None:
    """A socket that is one NUMA node: claims that select resource.kubernetes.io/numaNode or dra.cpu/numaNodeID
    (written for upstream's NUMA devices) still match."""
    devices = _devices(_slices(FIXTURES / "dual-socket-smt2", "--group-by", "socket", capsys=capsys))
    assert sorted(devices) == [
        "cpu-socket0",
        "cpu-socket1",
        "hugepages-2mi-numa0",
        "hugepages-2mi-numa1",
        "memory-numa0",
        "memory-numa1",
    ]
    attrs = devices["cpu-socket1"]["attributes"]
    assert attrs["resource.kubernetes.io/numaNode"] == {"int": 1}
    assert attrs["dra.cpu/numaNodeID"] == {"int": 1}
    assert attrs["dra.net/numaNode"] == {"int": 1}
    assert attrs["dra.cpu/socketID"] == {"int": 1}
    assert attrs["dra.cpu/numaNodeCount"] == {"int": 1}
    assert devices["cpu-socket1"]["capacity"]["dra.cpu/cpu"]["value"] == "8"


def test_group_by_machine(tmp_path: Path) -> None:
    """One device for every allocatable CPU; no socket or NUMA attribute on a machine with several; isolated CPUs
    still apart; hugepages per NUMA node as in every mode."""
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=1, cores_per_node=4, threads=2)
    # Core c is CPUs c and c + 8; NUMA node 0 holds cores 0-3, node 1 cores 4-7.
    write_tree(tmp_path, cpus, nodes, isolated=CPUSet.parse("7,15"))
    topo = read_topology(tmp_path)
    config = DeviceConfig(node_name="n", group_by=GroupBy.MACHINE, reserved_cpus=CPUSet.parse("0"), whole_cores=True)
    devices = {d.name: d for d in build_devices(topo, config)}
    assert sorted(devices) == ["cpu-isolated-machine", "cpu-machine", "memory-numa0", "memory-numa1"]
    machine = devices["cpu-machine"]
    assert str(machine.cpus) == "1-6,9-14", "core 0 (CPUs 0 and 8) is cut by the reservation: whole cores drop it"
    assert str(machine.numa_nodes) == "0-1"
    with pytest.raises(ValueError, match="spans NUMA nodes 0-1"):
        machine.numa_node  # noqa: B018
    api = machine.to_api()
    assert api["capacity"]["dra.cpu/cpu"]["requestPolicy"]["validRange"] == {"min": "2", "step": "2"}
    assert "resource.kubernetes.io/numaNode" not in api["attributes"]
    assert "dra.cpu/socketID" not in api["attributes"]
    assert api["attributes"]["dra.cpu/numaNodes"] == {"string": "0-1"}
    assert str(devices["cpu-isolated-machine"].cpus) == "7,15"
    assert dict(devices["cpu-isolated-machine"].attributes)["resource.kubernetes.io/numaNode"] == 1


def test_group_by_numanode_is_the_default_and_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    root = FIXTURES / "snc-4numa"
    assert _slices(root, capsys=capsys) == _slices(root, "--group-by", "numanode", capsys=capsys)
    devices = _devices(_slices(root, capsys=capsys))
    assert [n for n in devices if n.startswith("cpu-")] == ["cpu-numa0", "cpu-numa1", "cpu-numa2", "cpu-numa3"]
    assert "dra.cpu/numaNodes" not in devices["cpu-numa2"]["attributes"], "numaNode says it"
    assert devices["cpu-numa2"]["attributes"]["dra.cpu/socketID"] == {"int": 1}


def test_a_numa_node_device_carries_each_fact_once(capsys: pytest.CaptureFixture[str]) -> None:
    """The default shape (one device per NUMA node) of the 64-CPU, 8-NUMA capture: the upstream driver's attributes
    (for its claims), `type` (for the DeviceClasses), and nothing that another attribute or the node already says.
    Without memory devices the node's slices stay within 3.5 KB of JSON; each memory device adds at most 340 bytes
    (docs/scale.md)."""
    slices = _slices(FIXTURES / "big-8numa", capsys=capsys)
    device = _devices(slices)["cpu-numa3"]
    assert device["attributes"] == {
        "dra.cpu/type": {"string": "cpu"},
        "resource.kubernetes.io/numaNode": {"int": 3},
        "dra.cpu/numaNodeID": {"int": 3},
        "dra.net/numaNode": {"int": 3},
        "dra.cpu/socketID": {"int": 1},
        "dra.cpu/numCPUs": {"int": 8},
        "dra.cpu/smtEnabled": {"bool": True},
    }
    lean = _slices(FIXTURES / "big-8numa", "--no-publish-memory", capsys=capsys)
    assert not [name for name in _devices(lean) if name.startswith("memory-")]
    assert len(json.dumps(lean, separators=(",", ":"))) <= 3500
    memory = [device for name, device in _devices(slices).items() if name.startswith("memory-")]
    assert len(memory) == 8
    assert (len(json.dumps(slices, separators=(",", ":"))) - len(json.dumps(lean, separators=(",", ":")))) <= 8 * 340


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_compatibility_copies_can_be_turned_off(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = FIXTURES / "dual-socket-smt2"
    kept = _devices(_slices(root, *MODES[mode], capsys=capsys))
    lean = _devices(_slices(root, *MODES[mode], "--no-publish-numa-node-id", capsys=capsys))
    leaner = _devices(
        _slices(root, *MODES[mode], "--no-publish-numa-node-id", "--no-publish-dra-net-numa-node", capsys=capsys)
    )
    numa = {name: d["attributes"] for name, d in kept.items() if "resource.kubernetes.io/numaNode" in d["attributes"]}
    assert numa, "hugepage devices are on one NUMA node in every mode"
    for name, attributes in numa.items():
        assert attributes["dra.cpu/numaNodeID"] == attributes["dra.net/numaNode"]
        assert attributes["dra.cpu/numaNodeID"] == attributes["resource.kubernetes.io/numaNode"]
        assert set(attributes) - set(lean[name]["attributes"]) == {"dra.cpu/numaNodeID"}
        assert set(attributes) - set(leaner[name]["attributes"]) == {"dra.cpu/numaNodeID", "dra.net/numaNode"}


def test_only_isolated_cpus_say_so(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=1, cores_per_node=4, threads=1)
    write_tree(tmp_path, cpus, nodes, isolated=CPUSet.parse("3"))
    topology = read_topology(tmp_path)
    for mode in DeviceMode:
        config = DeviceConfig(node_name="n", device_mode=mode)
        flags = {d.name: d.to_api()["attributes"].get("dra.cpu/isolated") for d in build_devices(topology, config)}
        isolated = "cpu-3" if mode is DeviceMode.INDIVIDUAL else "cpu-isolated-numa0"
        assert flags == {name: {"bool": True} if name == isolated else None for name in flags}


def test_individual_devices_come_core_by_core_and_node_by_node(tmp_path: Path) -> None:
    """Siblings numbered apart (CPU c and c + 8, as on most Intel machines): the slice lists both threads of a core,
    then the next core of the same NUMA node, and the thread whose sibling (CPU 0) is kept for the shared pool after
    the node's whole cores, so that the scheduler's first free devices for a count are whole cores on one node."""
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=1, cores_per_node=4, threads=2)
    write_tree(tmp_path, cpus, nodes)
    config = DeviceConfig(node_name="n", device_mode=DeviceMode.INDIVIDUAL)
    [obj] = build_slices(build_devices(read_topology(tmp_path), config), config)
    names = [d["name"] for d in obj["spec"]["devices"]]
    assert names[:8] == ["cpu-1", "cpu-9", "cpu-2", "cpu-10", "cpu-3", "cpu-11", "cpu-8", "cpu-4"]
    assert names[8] == "cpu-12"


def test_slices_reads_the_daemons_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dra-cpu slices --config` prints what `dra-cpu run` with that file would publish, upstream keys included; a
    flag given beside the file wins, as for the daemon."""
    config = tmp_path / "config.yaml"
    config.write_text("cpuDeviceMode: individual\nreservedCpus: 0-3\n")
    devices = _devices(_slices(FIXTURES / "dual-socket-smt2", "--config", str(config), capsys=capsys))
    names = {name for name in devices if name.startswith("cpu-")}
    assert names and all(name.removeprefix("cpu-").isdigit() for name in names), names
    assert not {"cpu-0", "cpu-1", "cpu-2", "cpu-3"} & names, names
    grouped = _devices(
        _slices(FIXTURES / "dual-socket-smt2", "--config", str(config), "--device-mode", "grouped", capsys=capsys)
    )
    assert {"cpu-numa0", "cpu-numa1"} <= set(grouped), set(grouped)


def test_memory_per_numa_node_is_a_device_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    """dual-socket-smt2: node 0 has MemTotal 467628 kB (456.7 MiB) and 128 MiB of 2 MiB pages, node 1 513752 kB
    and 64 MiB. Each node's memory device publishes the rest less the default 5 % reservation, in whole MiB; the
    standard NUMA attribute ties it to the node's CPUs and pages."""
    devices = _devices(_slices(FIXTURES / "dual-socket-smt2", capsys=capsys))
    memory = devices["memory-numa0"]
    assert memory["allowMultipleAllocations"] is True
    assert memory["capacity"] == {
        "dra.cpu/memory": {
            "value": "305Mi",
            "requestPolicy": {"default": "1Mi", "validRange": {"min": "1Mi", "step": "1Mi"}},
        }
    }
    assert memory["attributes"] == {
        "dra.cpu/type": {"string": "memory"},
        "resource.kubernetes.io/numaNode": {"int": 0},
        "dra.cpu/numaNodeID": {"int": 0},
        "dra.net/numaNode": {"int": 0},
    }
    assert devices["memory-numa1"]["capacity"]["dra.cpu/memory"]["value"] == "412Mi"
    # The CPU devices are as they were: no memory capacity, so claims written for the upstream driver are unchanged.
    assert set(devices["cpu-numa0"]["capacity"]) == {"dra.cpu/cpu"}


@pytest.mark.parametrize(
    ("reserved", "values"),
    [
        ("0", ["328Mi", "437Mi"]),
        ("", ["328Mi", "437Mi"]),
        ("100Mi", ["228Mi", "337Mi"]),
        ("0:100Mi", ["228Mi", "437Mi"]),
        ("50%,1:10Mi", ["100Mi", "427Mi"]),
        ("1:100%", ["328Mi"]),
    ],
)
def test_reserved_memory_per_numa_node(reserved: str, values: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A quantity or a share of the node's MemTotal, for every node or `<node>:` one; a node named nowhere keeps
    nothing back (as the kubelet's --reserved-memory); a node with nothing left publishes no memory device."""
    devices = _devices(_slices(FIXTURES / "dual-socket-smt2", f"--reserved-memory={reserved}", capsys=capsys))
    memory = [d["capacity"]["dra.cpu/memory"]["value"] for name, d in sorted(devices.items()) if "memory" in name]
    assert memory == values


@pytest.mark.parametrize(
    ("reserved", "message"),
    [
        ("lots", "reservedMemory 'lots': 'lots' is neither a quantity nor a percentage"),
        ("1Gi,2Gi", "reservedMemory '1Gi,2Gi': two amounts for every node"),
        ("0:1Gi,0:2Gi", "reservedMemory '0:1Gi,0:2Gi': NUMA node 0 named twice"),
        ("101%", "reservedMemory '101%': '101%' reserves more than the whole node"),
        ("-1Mi", "reservedMemory '-1Mi': '-1Mi' must be a whole number of bytes, at least 0"),
        ("0.5", "reservedMemory '0.5': '0.5' must be a whole number of bytes, at least 0"),
    ],
)
def test_bad_reserved_memory_is_one_clear_line(reserved: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = FIXTURES / "dual-socket-smt2"
    assert main(["slices", "--sysfs-root", str(root), "--node-name", "node-a", f"--reserved-memory={reserved}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_memory_of_a_memory_only_node(capsys: pytest.CaptureFixture[str]) -> None:
    """CXL memory without CPUs: a memory device that says so, as its hugepage devices do."""
    devices = _devices(_slices(FIXTURES / "cxl-memoryless", capsys=capsys))
    only = [name for name, d in devices.items() if "dra.cpu/memoryOnly" in d["attributes"]]
    assert [n for n in only if n.startswith("memory-")], only
    for name in only:
        assert devices[name]["attributes"]["dra.cpu/memoryOnly"] == {"bool": True}


def test_memory_maps_to_node_allocatable_memory(capsys: pytest.CaptureFixture[str]) -> None:
    devices = _devices(_slices(FIXTURES / "dual-socket-smt2", "--publish-node-allocatable-resources", capsys=capsys))
    assert devices["memory-numa1"]["nodeAllocatableResources"] == {
        "memory": {"mapping": {"capacityKey": "dra.cpu/memory", "capacityMultiplier": "1"}}
    }
