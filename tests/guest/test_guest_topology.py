"""What the driver discovers inside the test guest is the machine qemu was told to emulate: sockets, cores, SMT
siblings, NUMA nodes with their distances, the memory-only node, hugepages reserved per node, the isolated CPU."""

from __future__ import annotations

import json
import re

from tests.harness.guest.vm import SPEC, Guest
from tests.harness.nodes.guest_standin import cpulist


def test_discover_matches_the_emulated_machine(guest: Guest) -> None:
    topology = guest.dra_cpu("discover", "-o", "json").json()

    assert topology["smtActive"] is True
    assert topology["threadsPerCore"] == SPEC.threads
    assert [cpu["id"] for cpu in topology["cpus"]] == list(range(SPEC.cpus))
    for cpu in topology["cpus"]:
        assert cpu["online"] is True
        assert cpu["socket"] == SPEC.socket_of(cpu["id"]), cpu
        assert cpu["numaNode"] == SPEC.node_of(cpu["id"]), cpu
        assert cpu["threadSiblings"] == list(SPEC.siblings_of(cpu["id"])), cpu
        assert cpu["isolated"] is (cpu["id"] == SPEC.isolated_cpu), cpu
    cores = {(cpu["socket"], cpu["core"]) for cpu in topology["cpus"]}
    assert len(cores) == SPEC.sockets * SPEC.cores

    summary = topology["summary"]
    assert summary["sockets"] == list(range(SPEC.sockets))
    assert summary["physicalCores"] == SPEC.sockets * SPEC.cores
    assert cpulist(summary["online"]) == set(range(SPEC.cpus))
    assert cpulist(summary["isolated"]) == {SPEC.isolated_cpu}

    nodes = {node["id"]: node for node in topology["numaNodes"]}
    assert sorted(nodes) == [n.id for n in SPEC.nodes]
    for want in SPEC.nodes:
        node = nodes[want.id]
        assert node["cpus"] == list(want.cpus)
        assert node["memoryOnly"] is (not want.cpus)
        assert node["distances"] == {str(other.id): SPEC.distance(want.id, other.id) for other in SPEC.nodes}
        # The kernel keeps some of each node for itself (more of node 0, which holds the kernel image).
        assert 0.75 * want.memory_mib < node["memoryBytes"] / 2**20 <= want.memory_mib, node["memoryBytes"]
        assert node["hugepages"]["2Mi"] == {"total": want.hugepages_2m, "free": want.hugepages_2m}
    assert topology["hugepages"]["2Mi"]["total"] == sum(n.hugepages_2m for n in SPEC.nodes)
    # qemu's one host bridge has no NUMA node (its devices' numa_node is -1); tests/fixtures/sysfs/pcie-expander-3numa
    # is this guest with a PCIe expander bus per node.
    assert topology["pcieRoots"] == [{"name": "pci0000:00", "numaNode": None}]


def test_the_guest_kernel_itself_has_that_topology(guest: Guest) -> None:
    """The same facts from the guest's sysfs and /proc, not through the driver: the fixture's machine is real."""
    sysfs = "/sys/devices/system"
    for n in SPEC.nodes:
        assert cpulist(guest.read(f"{sysfs}/node/node{n.id}/cpulist")) == set(n.cpus)
        distances = [int(d) for d in guest.read(f"{sysfs}/node/node{n.id}/distance").split()]
        assert distances == [SPEC.distance(n.id, other.id) for other in SPEC.nodes]
        pages = guest.read(f"{sysfs}/node/node{n.id}/hugepages/hugepages-2048kB/nr_hugepages")
        assert int(pages) == n.hugepages_2m
    for cpu in range(SPEC.cpus):
        siblings = guest.read(f"{sysfs}/cpu/cpu{cpu}/topology/thread_siblings_list")
        assert cpulist(siblings) == set(SPEC.siblings_of(cpu))
        assert int(guest.read(f"{sysfs}/cpu/cpu{cpu}/topology/physical_package_id")) == SPEC.socket_of(cpu)
    assert cpulist(guest.read(f"{sysfs}/cpu/isolated")) == {SPEC.isolated_cpu}
    # Pure cgroup v2: one cgroup2 mount on /sys/fs/cgroup, no v1 hierarchy, and cpuset offered to children.
    mounts = [line.split() for line in guest.read("/proc/self/mounts").splitlines()]
    assert [m[1] for m in mounts if m[2] == "cgroup2"] == ["/sys/fs/cgroup"]
    assert not [m for m in mounts if m[2] == "cgroup"]
    assert {"cpuset", "cpu", "memory", "hugetlb"} <= set(guest.read("/sys/fs/cgroup/cgroup.subtree_control").split())


def test_bench_numa_writes_the_node_matrix_with_placement_verified(guest: Guest) -> None:
    """Every (CPU node, memory node) pair, the memory-only node among the memory nodes, with the pages found by the
    kernel (numa_maps) on the node asked for. Figures are TCG's, not a NUMA machine's: only their presence counts."""
    out = "/tmp/bench-numa"
    # numpy's AVX2/AVX-512 kernels once killed python with SIGSEGV in this guest: QEMU 7.2 is the first release
    # whose TCG emulates AVX2. numpy's SSE4.2 baseline moves the same bytes, and placement is what is checked here.
    no_avx = {"NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"}
    report = guest.dra_cpu(
        "bench", "numa", "--quick", "-o", "json", "--output-dir", out, timeout=600, env=no_avx
    ).json()
    assert json.loads(guest.read(f"{out}/numa.json")) == report
    assert set(guest.run(["ls", out]).stdout.split()) >= {"numa.json", "numa-copy.png", "numa-latency.png"}

    cpu_nodes = [n.id for n in SPEC.nodes if n.cpus]
    assert report["cpuNodes"] == cpu_nodes
    assert report["memoryNodes"] == [n.id for n in SPEC.nodes]
    pairs = {(r["cpuNode"], r["memoryNode"]): r for r in report["results"]}
    assert set(pairs) == {(c, m) for c in cpu_nodes for m in report["memoryNodes"]}
    for (cpu_node, memory_node), row in pairs.items():
        assert row["valid"] is True, row
        # The benchmark's threads run where a pod without claims may: the node's CPUs but the isolated one.
        assert cpulist(row["cpus"]) == set(SPEC.nodes[cpu_node].cpus) - {SPEC.isolated_cpu}, row
        placement = row["placement"]
        assert placement["policy"] == f"bind:{memory_node}"
        assert placement["pagesByNode"] == {str(memory_node): placement["expectedPages"]}, row
        assert row["copyGBps"] > 0 and row["triadGBps"] > 0 and row["latencyNs"] > 0


def test_demo_confines_a_process_with_a_cgroup_v2_cpuset(guest: Guest) -> None:
    """`dra-cpu demo` walks a claim through the driver and confines a process with the cgroups module, which here
    finds cpuset on cgroup2 at /sys/fs/cgroup (the hybrid test machines only ever show it v1)."""
    out = guest.dra_cpu("demo", "--cpus", "2").stdout
    assert "cpu-isolated-numa1" in out and "hugepages-2mi-numa2" in out, out
    chosen = re.search(r"chosen CPUs: (\S+)", out)
    assert chosen is not None, out
    assert len(cpulist(chosen[1])) == 2, out
    assert f"confined by a cgroup-v2 cpuset reads Cpus_allowed_list: {chosen[1]} " in out, out
    assert "Demo succeeded" in out
    # It leaves no cgroup behind.
    assert guest.run("find /sys/fs/cgroup -mindepth 1 -type d -name 'dra-cpu-demo-*'").stdout == ""
