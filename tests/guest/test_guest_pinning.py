"""The driver on a multi-NUMA node that a real kernel enforces: `dra-cpu run --enforcement nri` with containerd 2.1
on pure cgroup v2, inside the test guest. Claims are written as the scheduler leaves them and prepared through the
kubelet socket; containers get the claims' CDI devices through CRI. Every check reads the guest kernel: the task's
Cpus_allowed_list and Mems_allowed_list, the container's cgroup files, /proc/<pid>/numa_maps, sysfs."""

from __future__ import annotations

import uuid

import yaml

from tests.harness.guest.vm import SPEC
from tests.harness.nodes.fixtures import only_newest_containerd
from tests.harness.nodes.guest_standin import (
    GUEST_INTERVAL,
    GUEST_USR,
    PYTHON_ENV,
    GuestStandinNode,
    container_python,
    cpulist,
    pages_by_node,
    result,
)
from tests.harness.poll import NotYet, wait_until

pytestmark = only_newest_containerd

PAGE_2M = 2 << 20
TOUCH_MIB = 32

# A container's main process: touch TOUCH_MIB of anonymous memory (and, given a count, that many 2 MiB hugepages),
# then hold it all until stopped.
HOLD_MEMORY = """
import mmap, sys, time
def touch(size, flags):
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    for offset in range(0, size, 4096):
        m[offset] = 1
    return m
held = [touch(int(sys.argv[1]) << 20, 0)]
if len(sys.argv) > 2:
    held.append(touch(int(sys.argv[2]) * (2 << 20), 0x40000))  # MAP_HUGETLB, the default (2 MiB) size
time.sleep(1e9)
"""

# In an exec: map and touch N more 2 MiB hugepages; exit 0 if that worked, 3 if the mmap was refused.
MAP_HUGEPAGES = """
import mmap, sys
try:
    m = mmap.mmap(-1, int(sys.argv[1]) * (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000)
except OSError as e:
    print("mmap refused:", e)
    sys.exit(3)
for offset in range(0, len(m), 2 << 20):
    m[offset] = 1
print("touched")
"""


def node_cpus(node: int) -> frozenset[int]:
    return frozenset(next(n.cpus for n in SPEC.nodes if n.id == node))


def test_claim_split_over_both_nodes_pins_the_container_and_others_keep_off(guest_node: GuestStandinNode) -> None:
    node = guest_node
    general = node.online() - set(SPEC.isolated_cpus)
    bystander = node.create_container(node.run_pod("bystander"), "app")
    node.assert_allowed(bystander, general, mems=SPEC.memory_nodes)

    # The shape of hack/examples/claim-cpu-capacity-20.yaml: one request per NUMA node.
    pod = node.run_pod("app", uid=str(uuid.uuid4()))
    claim = node.prepared(
        [result("cpu-numa0", "numa0-cpus", cpus=2), result("cpu-numa1", "numa1-cpus", cpus=2)], [pod.uid]
    )
    granted = node.granted(claim)
    assert len(granted & node_cpus(0)) == 2 and len(granted & node_cpus(1)) == 2, granted
    assert not set(SPEC.isolated_cpus) & granted
    # Whole cores first: each node's two CPUs are the two threads of one core.
    for n in (0, 1):
        mine = granted & node_cpus(n)
        assert mine == frozenset(SPEC.siblings_of(min(mine))), granted
    # Prepare shrinks the running bystander at once, before any container of the claim exists.
    node.assert_allowed(bystander, general - granted)

    app = node.create_container(
        pod, "app", claims=[claim], mounts=[GUEST_USR], env=PYTHON_ENV, command=container_python(HOLD_MEMORY, "32")
    )
    node.assert_allowed(app, granted, mems=SPEC.memory_nodes)
    assert cpulist(node.cgroup_file(app, "cpuset.cpus")) == granted
    assert cpulist(node.cgroup_file(app, "cpuset.mems")) == SPEC.memory_nodes
    assert f"DRA_CPUSET_{claim.uid}" in node.exec(app, ["env"])["stdout"]
    # The memory it touched is on its nodes, none on the memory-only node 2.
    pid = node.pid(app)

    def touched() -> bool | NotYet:
        pages = pages_by_node(node.guest.read(f"/proc/{pid}/numa_maps"))
        return True if sum(pages.values()) >= TOUCH_MIB * 256 else NotYet(pages)

    wait_until(touched, "the container to touch its memory", interval=GUEST_INTERVAL)
    pages = pages_by_node(node.guest.read(f"/proc/{pid}/numa_maps"))
    assert set(pages) <= {0, 1}, pages
    node.assert_sidecar_shared_then_released(pod, claim, bystander, general)


def test_hugepages_claim_limits_the_container_to_its_pages_on_its_node(guest_node: GuestStandinNode) -> None:
    """hack/examples/claim-cpu-hugepages-2mi.yaml's shape on node 1: 2 CPUs and 16 MiB of 2 MiB pages."""
    node = guest_node
    pages, sysfs = 8, "/sys/devices/system/node/node{}/hugepages/hugepages-2048kB/free_hugepages"
    free_before = {n.id: int(node.guest.read(sysfs.format(n.id))) for n in SPEC.nodes}
    pod = node.run_pod("hugepages", uid=str(uuid.uuid4()))
    claim = node.prepared(
        [result("cpu-numa1", "cpus", cpus=2), result("hugepages-2mi-numa1", "hugepages", memory=f"{pages * 2}Mi")],
        [pod.uid],
    )
    granted = node.granted(claim)
    assert granted <= node_cpus(1)
    app = node.create_container(
        pod,
        "app",
        claims=[claim],
        mounts=[GUEST_USR],
        env=PYTHON_ENV,
        command=container_python(HOLD_MEMORY, str(TOUCH_MIB), str(pages)),
    )
    node.assert_allowed(app, granted, mems=SPEC.memory_nodes)
    limit = pages * PAGE_2M
    assert int(node.cgroup_file(app, "hugetlb.2MB.max")) == limit
    # The enforcer writes the reservation limit itself at StartContainer: the guest's bookworm runc 1.1.5 does not.
    rsvd = node.cgroup_file(app, "hugetlb.2MB.rsvd.max")
    assert rsvd == str(limit), rsvd

    # Its pages come from node 1's pool, and its anonymous memory from node 1.
    pid = node.pid(app)

    def held() -> bool | NotYet:
        maps = node.guest.read(f"/proc/{pid}/numa_maps")
        done = pages_by_node(maps, huge=True) == {1: pages} and sum(pages_by_node(maps).values()) >= TOUCH_MIB * 256
        return True if done else NotYet(maps)

    wait_until(held, "the container to hold its hugepages and memory", interval=GUEST_INTERVAL)
    assert set(pages_by_node(node.guest.read(f"/proc/{pid}/numa_maps"))) == {1}
    free_now = {n.id: int(node.guest.read(sysfs.format(n.id))) for n in SPEC.nodes}
    assert free_now == {**free_before, 1: free_before[1] - pages}
    assert int(node.cgroup_file(app, "hugetlb.2MB.current")) == limit

    # One page more than the claim is refused at mmap: the reservation limit, not a SIGBUS at first touch.
    more = node.exec(app, container_python(MAP_HUGEPAGES, "1"))
    assert more["rc"] == 3, more
    assert int(node.cgroup_file(app, "hugetlb.2MB.current")) == limit


def test_isolated_cpu_claim_gets_the_isolated_cpu(guest_node: GuestStandinNode) -> None:
    node = guest_node
    general = node.online() - set(SPEC.isolated_cpus)
    bystander = node.create_container(node.run_pod("bystander"), "app")
    pod = node.run_pod("isolated", uid=str(uuid.uuid4()))
    [isolated] = SPEC.isolated_cpus
    claim = node.prepared([result(f"cpu-isolated-numa{SPEC.node_of(isolated)}", cpus=1)], [pod.uid])
    assert node.granted(claim) == set(SPEC.isolated_cpus)
    app = node.create_container(pod, "app", claims=[claim])
    node.assert_allowed(app, set(SPEC.isolated_cpus), mems=SPEC.memory_nodes)
    # The isolated CPU was never the shared pool's: the bystander keeps every other CPU.
    node.assert_allowed(bystander, general)


def _cpu_device(node: GuestStandinNode, name: str) -> dict[str, object]:
    listing = node.guest.run(["sh", "-c", f"cat {node.cluster}/resourceslices/*.yaml"]).stdout
    devices = {d["name"]: d for s in yaml.safe_load_all(listing) if s for d in s["spec"]["devices"]}
    device: dict[str, object] = devices[name]
    return device


def _num_cpus(node: GuestStandinNode, name: str) -> int:
    attributes = _cpu_device(node, name)["attributes"]
    assert isinstance(attributes, dict)
    return int(attributes["dra.cpu/numCPUs"]["int"])


def test_cpu_hotplug_republishes_the_slices(guest_node: GuestStandinNode) -> None:
    node = guest_node
    cpu = 5
    before = _num_cpus(node, "cpu-numa1")
    assert before == len(node_cpus(1) - set(SPEC.isolated_cpus))
    bystander = node.create_container(node.run_pod("bystander"), "app")
    general = node.online() - set(SPEC.isolated_cpus)
    try:
        node.guest.write(f"/sys/devices/system/cpu/cpu{cpu}/online", "0")
        assert cpu not in node.online()
        wait_until(
            lambda: _num_cpus(node, "cpu-numa1") == before - 1,
            f"cpu-numa1 republished without CPU {cpu}",
            interval=GUEST_INTERVAL,
        )
        capacity = _cpu_device(node, "cpu-numa1")["capacity"]
        assert isinstance(capacity, dict) and capacity["dra.cpu/cpu"]["value"] == str(before - 1)
        node.assert_allowed(bystander, general - {cpu})
    finally:
        node.guest.write(f"/sys/devices/system/cpu/cpu{cpu}/online", "1")
    assert cpu in node.online()
    wait_until(
        lambda: _num_cpus(node, "cpu-numa1") == before,
        f"cpu-numa1 republished with CPU {cpu} again",
        interval=GUEST_INTERVAL,
    )
    node.assert_allowed(bystander, general)
