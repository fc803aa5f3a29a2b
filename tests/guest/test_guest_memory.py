"""Memory per NUMA node, counted and bound, on a kernel that has the NUMA nodes (issue 23): the test guest joined
as node numa-guest (tests/harness/nodes/guest_kubelet.py), kube-scheduler 1.37 allocating the memory devices the
driver publishes, the guest's kubelet preparing the claims with dra-cpu (NRI enforcement, containerd 2.1).

What is asserted is read back: the memory device's capacity from the API server against the guest node's own
meminfo, the claims' allocations, the driver's checkpoint, and each container's cgroup `cpuset.mems` and its first
process's Mems_allowed_list from the guest itself:
- a claim of CPUs and memory of NUMA node 0 binds the container's memory to node 0, and the bytes are counted there;
- a second claim for more than node 0 has left is never allocated: the pod stays Pending with the scheduler's
  reason, instead of being bound to node 0 and OOM-killed while node 1 is free;
- a claim of CPUs only is no OOM trap: its container keeps every node with memory (docs/user.md, "Memory on the
  claim's NUMA node").
"""

from __future__ import annotations

from typing import Any

import pytest

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.memory import DEFAULT_RESERVED_MEMORY, MEMORY_STEP, allocatable_memory, parse_reserved_memory
from dra_cpu.core.topology import HugePagePool, NumaNode
from tests.harness.cluster.memory import memory_pod, numa_claim, published_memory
from tests.harness.cluster.objects import claim_path, pinned_pod
from tests.harness.cluster.pods import create_all, delete_pod, unschedulable, wait_running
from tests.harness.guest.vm import SPEC
from tests.harness.nodes.guest_kubelet import GuestKubeletNode
from tests.harness.nodes.kubelet import container_id

CLAIMED = 200 << 20
"""Node 0's memory a claim takes: well within the guest's 1 GiB node, well beyond one page."""
RUNNING_SECONDS = 240.0
"""Scheduling, prepare and the container's start, on the emulated guest of a loaded 2-core machine."""
# The module's guest node starts in the first test's setup: boot and kubelet about 70 s, then the driver's image
# imported into the guest's containerd, 2 to 4 minutes under TCG on 2 busy cores (past the suite's 300 s).
pytestmark = pytest.mark.timeout(900)

NODES_WITH_MEMORY = CPUSet.of(n.id for n in SPEC.nodes if n.memory_mib)


def pod(name: str, node: str, memory: int) -> dict[str, Any]:
    obj = pinned_pod(memory_pod(name, memory), node)
    obj["spec"]["hostNetwork"] = True  # the guest's node has no pod network (tests/harness/nodes/guest_kubelet.py)
    return obj


def numa_node(node: GuestKubeletNode, numa: int) -> NumaNode:
    """A NUMA node's memory and 2 MiB pages as the guest kernel counts them: MemTotal from its meminfo
    (`Node 0 MemTotal: 1012345 kB`), the pages it could reserve."""
    folder = f"/sys/devices/system/node/node{numa}"
    meminfo = node.guest.read(f"{folder}/meminfo").splitlines()
    total = next(int(line.split()[-2]) * 1024 for line in meminfo if "MemTotal:" in line)
    pages = int(node.guest.read(f"{folder}/hugepages/hugepages-2048kB/nr_hugepages"))
    return NumaNode(numa, CPUSet(), (), total, (HugePagePool(2048, pages, pages),))


def test_memory_of_a_numa_node_is_counted_and_bound_there(guest_kubelet: GuestKubeletNode, namespace: str) -> None:
    node, kube = guest_kubelet, guest_kubelet.kube

    # Each node's device publishes its MemTotal less its pages and the default 5 %, as core/memory.py computes it.
    published = published_memory(kube, node.name)
    assert set(published) == set(NODES_WITH_MEMORY), published
    reserved = parse_reserved_memory(DEFAULT_RESERVED_MEMORY)
    for numa in NODES_WITH_MEMORY:
        assert published[numa] == allocatable_memory(numa_node(node, numa), reserved), (numa, published)
    free = published[0]
    assert free > CLAIMED and free % MEMORY_STEP == 0

    # CPUs and memory of node 0: bound there, in the cgroup and as the kernel reports the task.
    create_all(kube, namespace, [numa_claim("bound", 0, 1, CLAIMED), pod("bound", node.name, CLAIMED)])
    running = wait_running(kube, namespace, "bound", RUNNING_SECONDS, details=node.describe)
    uid = kube.get(claim_path(namespace, "bound"))["metadata"]["uid"]
    record = node.checkpoint_claims()[uid]
    assert [d["memory"] for d in record["devices"] if d.get("memory")] == [{"numaNode": 0, "bytes": CLAIMED}], record
    assert record["memoryBinding"] is None, record  # the default for a claim with memory: strict
    container = container_id(running)
    node0 = CPUSet.of([0])
    assert node.cpuset(container)[1] == node0
    assert node.allowed(container).mems == node0

    # More than node 0 has left: the memory device has no room, so the scheduler never allocates it there.
    over = free - CLAIMED + MEMORY_STEP
    create_all(kube, namespace, [numa_claim("over", 0, 1, over), pod("over", node.name, over)])
    message = unschedulable(kube, namespace, "over", RUNNING_SECONDS)
    assert "cannot allocate all claims" in message, message
    assert not kube.get(claim_path(namespace, "over")).get("status", {}).get("allocation"), "never allocated"

    # CPUs only: nothing counted, so nothing bound; every node with memory stays the container's.
    create_all(kube, namespace, [numa_claim("cpus-only", 0, 1), pod("cpus-only", node.name, 0)])
    running = wait_running(kube, namespace, "cpus-only", RUNNING_SECONDS, details=node.describe)
    container = container_id(running)
    assert node.cpuset(container)[1] == NODES_WITH_MEMORY
    assert node.allowed(container).mems == NODES_WITH_MEMORY

    # Once the bound claim's pod is gone, the waiting claim fits node 0 again and its pod runs bound there.
    delete_pod(kube, namespace, "bound", timeout=RUNNING_SECONDS)
    running = wait_running(kube, namespace, "over", RUNNING_SECONDS, details=node.describe)
    assert node.cpuset(container_id(running))[1] == node0
