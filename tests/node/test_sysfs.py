from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dra_cpu.cli import main
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.node import sysfs
from dra_cpu.node.sysfs import SysfsError, read_topology
from dra_cpu.tools.render import topology_table
from tests.harness.paths import SYSFS
from tests.harness.synthetic_sysfs import SyntheticCpu, SyntheticNode, uniform_machine, write_pcie_root, write_tree


def test_fixture_matches_expected_field_by_field(sysfs_fixture: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = json.loads((sysfs_fixture / "expected.json").read_text())
    assert main(["discover", "--sysfs-root", str(sysfs_fixture), "--output", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in got["cpus"]] == [c["id"] for c in expected["cpus"]]
    for want, have in zip(expected["cpus"], got["cpus"], strict=True):
        for key, value in want.items():
            assert have[key] == value, f"cpu {want['id']} {key}"
    assert [n["id"] for n in got["numaNodes"]] == [n["id"] for n in expected["numaNodes"]]
    for want, have in zip(expected["numaNodes"], got["numaNodes"], strict=True):
        for key, value in want.items():
            assert have[key] == value, f"node {want['id']} {key}"
    # Captures made before PCIe roots were read keep no PCI folders.
    assert got["pcieRoots"] == expected.get("pcieRoots", [])


def test_fixture_summary_agrees_with_raw_facts(sysfs_fixture: Path) -> None:
    raw = json.loads((sysfs_fixture / "expected.json").read_text())["summary"]
    topo = read_topology(sysfs_fixture)
    assert topo.sockets == raw["sockets"]
    assert len(topo.cores()) == raw["physical_cores_online"]
    assert [topo.threads_per_core] == raw["threads_per_core"]
    assert sorted(str(g) for g in topo.l3_groups().values()) == sorted(raw["l3_groups_by_shared_cpu_list"])


def test_memory_only_node(tmp_path: Path) -> None:
    topo = read_topology(SYSFS / "cxl-memoryless")
    node2 = topo.node(2)
    assert node2.memory_only and not node2.cpus
    assert node2.memory_bytes > 0
    assert node2.distance_to(0) == 30


def test_live_machine_agrees_with_the_kernel() -> None:
    topo = read_topology("/")
    assert topo.online_cpus == CPUSet.parse(Path("/sys/devices/system/cpu/online").read_text())
    assert topo.numa_nodes, "every Linux machine has at least node 0"
    allowed = CPUSet.parse(_status_field(os.getpid(), "Cpus_allowed_list"))
    assert allowed.issubset(topo.online_cpus)


def _status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in /proc/{pid}/status")


def test_odd_machine(tmp_path: Path) -> None:
    """SMT-4, an offline CPU, isolated and nohz_full CPUs, no L3, caches without ids, a node without hugepages."""
    quad = CPUSet.parse("0-3")
    cpus = [SyntheticCpu(id=i, core=0, siblings=quad, l2=0, l3=None, cache_ids=False) for i in range(4)]
    cpus += [SyntheticCpu(id=4, core=1, node=1, l3=None), SyntheticCpu(id=5, core=2, node=1, online=False)]
    nodes = [
        SyntheticNode(id=0, cpus=CPUSet.parse("0-3"), hugepages={2048: (8, 6), 1048576: (1, 1)}),
        SyntheticNode(id=1, cpus=CPUSet.parse("4-5")),
    ]
    write_tree(tmp_path, cpus, nodes, isolated=CPUSet.parse("3"), nohz_full=CPUSet.parse("2-3"))
    topo = read_topology(tmp_path)
    assert topo.threads_per_core == 4
    assert topo.smt_active
    assert [str(c) for c in topo.cores()] == ["0-3", "4"]
    assert topo.cpu(0).l2_cache == 0, "without an id the lowest CPU sharing the cache names it"
    assert topo.cpu(0).l3_cache is None
    assert topo.cpu(0).cluster is None, "cluster_id 65535 means no cluster"
    offline = topo.cpu(5)
    assert not offline.online and offline.core is None and offline.socket is None and offline.numa_node == 1
    assert str(topo.offline_cpus) == "5"
    assert str(topo.isolated_cpus) == "3"
    assert topo.cpu(2).nohz_full and not topo.cpu(1).nohz_full
    assert {p.quantity: (p.total, p.free) for p in topo.node(0).hugepages} == {"2Mi": (8, 6), "1Gi": (1, 1)}
    assert topo.node(1).hugepages == ()
    assert {p.quantity: p.total for p in topo.hugepages} == {"2Mi": 8, "1Gi": 1}
    groups = topo.l3_groups()
    assert len(groups) == 5, "CPUs without an L3 each form their own group"


def test_hybrid_core_types(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=1, cores_per_node=4, threads=1)
    write_tree(tmp_path, cpus, nodes)
    (tmp_path / "sys/devices/cpu_core").mkdir(parents=True)
    (tmp_path / "sys/devices/cpu_core/cpus").write_text("0-1\n")
    (tmp_path / "sys/devices/cpu_atom").mkdir(parents=True)
    (tmp_path / "sys/devices/cpu_atom/cpus").write_text("2-3\n")
    topo = read_topology(tmp_path)
    assert [topo.cpu(i).core_type for i in range(4)] == ["performance"] * 2 + ["efficiency"] * 2


def test_kernel_without_numa(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=1, cores_per_node=2, threads=1)
    write_tree(tmp_path, cpus, nodes)
    shutil.rmtree(tmp_path / "sys/devices/system/node")
    (tmp_path / "proc/meminfo").write_text("MemTotal:       2048 kB\n")
    topo = read_topology(tmp_path)
    assert [(n.id, str(n.cpus), n.memory_bytes) for n in topo.numa_nodes] == [(0, "0-1", 2048 * 1024)]


@pytest.mark.parametrize(
    ("rel", "content", "message"),
    [
        ("sys/devices/system/cpu/online", "0-x", "invalid cpu id 'x'"),
        ("sys/devices/system/cpu/cpu1/topology/core_id", "banana", "expected an integer, found 'banana'"),
        ("sys/devices/system/node/node0/distance", "10 abc", "found '10 abc'"),
        ("sys/devices/system/node/node0/meminfo", "Node 0 MemTotal: lots kB", "MemTotal is not a number"),
        ("sys/devices/system/cpu/online", "0-99999999", "is outside 0-16383"),
        ("sys/devices/system/cpu/cpu1/topology/core_id", "9" * 5000, "found '99999999"),
    ],
)
def test_bad_content_is_one_clear_line_and_exit_2(
    tmp_path: Path, rel: str, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=1, cores_per_node=2, threads=1)
    write_tree(tmp_path, cpus, nodes)
    (tmp_path / rel).write_text(content + "\n")
    with pytest.raises(SysfsError, match=message):
        read_topology(tmp_path)
    assert main(["discover", "--sysfs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / rel) in err and message in err


def _two_node_tree(root: Path) -> Path:
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=1, cores_per_node=4, threads=1)
    return write_tree(root, cpus, nodes)


def test_cpu_in_two_nodes_is_refused_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: CPU 3 counted on both nodes, and the slices published 9 CPUs of an 8-CPU machine."""
    _two_node_tree(tmp_path)
    (tmp_path / "sys/devices/system/node/node1/cpulist").write_text("3-7\n")
    with pytest.raises(SysfsError, match=r"^sysfs: CPU 3 is in the cpulist of node0 and node1$"):
        read_topology(tmp_path)
    assert main(["discover", "--sysfs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CPU 3 is in the cpulist of node0 and node1" in err


@pytest.mark.parametrize("node_online", [True, False], ids=["listed-online", "not-listed"])
def test_missing_node_folder_is_refused_with_exit_2(
    tmp_path: Path, node_online: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: node1's CPUs silently disappeared from the topology and discover exited 0."""
    _two_node_tree(tmp_path)
    shutil.rmtree(tmp_path / "sys/devices/system/node/node1")
    if not node_online:
        (tmp_path / "sys/devices/system/node/online").unlink()
        (tmp_path / "sys/devices/system/node/node0/distance").unlink()  # else its 2 columns name the lost node
    message = (
        r"online CPU\(s\) 4-7 are in no NUMA node's cpulist \(nodes: node0;.*nodeN/ folder missing"
        if not node_online
        else r"node1 is online in .*/node/online but .*/node1 is missing"
    )
    with pytest.raises(SysfsError, match=message):
        read_topology(tmp_path)
    assert main(["discover", "--sysfs-root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_offline_cpu_outside_every_cpulist_is_normal(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=2, nodes_per_socket=1, cores_per_node=4, threads=1)
    cpus = [SyntheticCpu(c.id, node=c.node, online=c.id != 7) for c in cpus]
    nodes = [SyntheticNode(n.id, n.cpus - CPUSet.of([7])) for n in nodes]
    topo = read_topology(write_tree(tmp_path, cpus, nodes))
    assert str(topo.online_cpus) == "0-6" and str(topo.node(1).cpus) == "4-6"


def test_a_file_that_is_not_utf8_is_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cpus, nodes = uniform_machine(sockets=1, nodes_per_socket=1, cores_per_node=2, threads=1)
    write_tree(tmp_path, cpus, nodes)
    path = tmp_path / "sys/devices/system/cpu/online"
    path.write_bytes(b"0-\xff\n")
    assert main(["discover", "--sysfs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"dra-cpu discover: {path} is not UTF-8 text: byte b'\\xff' at offset 2\n"


def test_missing_root_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["discover", "--sysfs-root", str(tmp_path / "nowhere")]) == 2
    assert "is --sysfs-root right?" in capsys.readouterr().err


def test_table_shows_nodes_memory_and_hugepages() -> None:
    root = SYSFS / "dual-socket-smt2"
    out = subprocess.run(
        [sys.executable, "-m", "dra_cpu", "discover", "--sysfs-root", str(root)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "2 thread(s) per core, 8 physical cores online" in out
    assert "0     0-7" in out and "2Mi 64/64" in out and "2Mi 32/32" in out
    assert "L3 groups:    0:0-7  1:8-15" in out


def test_large_generated_machine(tmp_path: Path) -> None:
    cpus, nodes = uniform_machine(sockets=4, nodes_per_socket=4, cores_per_node=32, threads=2, l3_per_node=2)
    write_tree(tmp_path, cpus, nodes)
    topo = read_topology(tmp_path)
    assert len(topo.cpus) == 1024 and len(topo.numa_nodes) == 16
    assert len(topo.cores()) == 512
    assert len(topo.l3_groups()) == 32
    assert str(topo.node(0).cpus) == "0-31,512-543"


def test_pcie_roots_of_the_expander_capture_agree_with_the_kernels_cpulistaffinity() -> None:
    """The capture's roots sit on nodes 0, 1 and 2 (memory-only) and pci0000:00 on none; the node read from the
    root bus's devices gives the CPUs the kernel itself lists in pci_bus/<bus>/cpulistaffinity."""
    root = SYSFS / "pcie-expander-3numa"
    topo = read_topology(root, pcie_roots=True)
    assert [(r.name, r.numa_node) for r in topo.pcie_roots] == [
        ("pci0000:00", None),
        ("pci0000:10", 0),
        ("pci0000:20", 1),
        ("pci0000:30", 2),
    ]
    for pcie_root in topo.pcie_roots:
        affinity = root / "sys/devices" / pcie_root.name / "pci_bus" / pcie_root.name[3:] / "cpulistaffinity"
        local = topo.online_cpus if pcie_root.numa_node is None else topo.node(pcie_root.numa_node).cpus
        assert CPUSet.parse(affinity.read_text()) == local, pcie_root.name
    assert read_topology(root).pcie_roots == (), "read only when asked"
    assert "PCIe roots:   pci0000:00:any  pci0000:10:node0  pci0000:20:node1  pci0000:30:node2" in topology_table(topo)
    # The devices behind the root ports carry their root's node too.
    assert (root / "sys/devices/pci0000:20/0000:20:00.0/0000:21:00.0/numa_node").read_text().strip() == "1"


def test_pcie_roots_without_devices_or_nodes(tmp_path: Path) -> None:
    _two_node_tree(tmp_path)
    write_pcie_root(tmp_path, "pci0000:00", {"0000:00:00.0": -1, "0000:00:01.0": -1})
    write_pcie_root(tmp_path, "pci0000:40", {})  # a root bus without PCI devices: nothing can be near it
    write_pcie_root(tmp_path, "pci10000:80", {"10000:80:00.0": 1, "10000:80:01.0": 1})  # a wide domain
    write_pcie_root(tmp_path, "pci0001:00", {"0001:00:00.0": None})  # no numa_node file: a kernel without NUMA
    (tmp_path / "sys/devices/pci0000:00/QEMU0002:00").mkdir()  # non-PCI children are not devices of the bus
    (tmp_path / "sys/devices/pci_other").mkdir()  # not a root complex's name
    topo = read_topology(tmp_path, pcie_roots=True)
    assert [(r.name, r.numa_node) for r in topo.pcie_roots] == [
        ("pci0000:00", None),
        ("pci0001:00", None),
        ("pci10000:80", 1),
    ]
    assert topo.pcie_roots_local_to(CPUSet.of([0])) == ("pci0000:00", "pci0001:00")
    assert topo.pcie_roots_local_to(CPUSet.of([1])) == ("pci0000:00", "pci0001:00", "pci10000:80")


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ({"0000:10:00.0": "zero"}, r"0000:10:00\.0/numa_node: expected an integer, found 'zero'$"),
        ({"0000:10:00.0": "-2"}, r"0000:10:00\.0/numa_node: expected a NUMA node or -1, found -2$"),
        ({"0000:10:00.0": "5"}, r"0000:10:00\.0/numa_node: NUMA node 5 is not online \(online nodes: 0,1\)$"),
        (
            {"0000:10:00.0": "0", "0000:10:01.0": "1"},
            r"^sysfs: devices on one PCIe root bus disagree on its NUMA node: \S+/0000:10:00\.0/numa_node says 0, "
            r"\S+/0000:10:01\.0/numa_node says 1$",
        ),
        ({"0000:11:00.0": "0"}, r"^sysfs: \S+/pci0000:10/0000:11:00\.0 is not on the root bus 0000:10 it is under$"),
    ],
)
def test_bad_pcie_root_is_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], devices: dict[str, str], message: str
) -> None:
    _two_node_tree(tmp_path)
    for bdf, content in devices.items():
        path = tmp_path / "sys/devices/pci0000:10" / bdf / "numa_node"
        path.parent.mkdir(parents=True)
        path.write_text(content + "\n")
    with pytest.raises(SysfsError, match=message):
        read_topology(tmp_path, pcie_roots=True)
    read_topology(tmp_path)  # without publishPcieRoots the PCI folders are not read at all
    assert main(["discover", "--sysfs-root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _offlined_mid_read(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[str]:
    """The first `failures` reads of cpu1's cluster_id answer ENODEV, as a CPU's attributes do while the kernel takes
    it offline (what the real hotplug test in tests/node/test_watch.py once met); returns the reads made of it."""
    reads: list[str] = []
    real = sysfs._Reader.text

    def text(self: sysfs._Reader, rel: str) -> str | None:
        if rel.endswith("cpu1/topology/cluster_id"):
            reads.append(rel)
            if len(reads) <= failures:
                raise sysfs.DeviceGone(f"cannot read {self.path(rel)}: No such device")
        return real(self, rel)

    monkeypatch.setattr(sysfs._Reader, "text", text)
    monkeypatch.setattr(sysfs, "TORN_READ_PAUSE_SECONDS", 0.001)
    return reads


def test_a_read_torn_by_a_hotplug_is_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = read_topology(SYSFS / "dual-socket-smt2")
    reads = _offlined_mid_read(monkeypatch, failures=sysfs.TORN_READ_TRIES - 1)
    assert read_topology(SYSFS / "dual-socket-smt2") == expected
    assert len(reads) == sysfs.TORN_READ_TRIES


def test_a_device_that_stays_gone_is_one_error_naming_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    _offlined_mid_read(monkeypatch, failures=sysfs.TORN_READ_TRIES)
    with pytest.raises(SysfsError, match=r"cpu1/topology/cluster_id: No such device"):
        read_topology(SYSFS / "dual-socket-smt2")
