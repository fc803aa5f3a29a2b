"""A claim across both NUMA nodes, end to end with the real components on a kernel that has the NUMA nodes: the test
guest joined to the test control plane as a node (tests/harness/nodes/guest_kubelet.py), kube-scheduler 1.37
allocating the claim there, the guest's kubelet 1.37 preparing it with dra-cpu (the chart's DaemonSet pod, NRI
enforcement) and containerd 2.1 starting the container, on the pod network of the guest, on the claim's CPUs. Then one
of those CPUs goes offline, and the kubelet shows the device Unhealthy, with the driver's reason, in the pod's status.

What is asserted is read back: the claim's allocation and the pod's status from the API server, the driver's
checkpoint, and the container's first process's Cpus_allowed_list and Mems_allowed_list and its cgroup's cpuset from
the guest itself.
"""

from __future__ import annotations

from typing import Any

import pytest

from dra_cpu.core.cpuset import CPUSet
from tests.harness.cluster.objects import CPU_CAPACITY, busybox_pod, claim_path, pinned_pod
from tests.harness.cluster.pods import create_all, wait_running
from tests.harness.guest.vm import SPEC
from tests.harness.nodes.guest_kubelet import GuestKubeletNode
from tests.harness.nodes.kubelet import container_id
from tests.harness.poll import wait_until
from tests.harness.runtimes.cri import Allowed

CPUS_PER_NODE = 2
"""Of each NUMA node's four CPUs (one of node 1's is isolated): a whole core each, and two left shared."""
RUNNING_SECONDS = 240.0
"""Scheduling, prepare and the container's start, on the emulated guest of a loaded 2-core machine."""
HEALTH_SECONDS = 120.0
"""The driver notices within a second (uevents, its 1 s poll); the kubelet writes the pod's status at its next sync."""

# The module's guest node starts in the first test's setup: boot and kubelet about 70 s, then the driver's image
# imported into the guest's containerd, 2 to 4 minutes under TCG on 2 busy cores (past the suite's 300 s).
pytestmark = pytest.mark.timeout(900)


def numa_request(name: str, node: int) -> dict[str, Any]:
    selector = f'device.attributes["resource.kubernetes.io"].numaNode == {node}'
    return {
        "name": name,
        "exactly": {
            "deviceClassName": "dra.cpu",
            "capacity": {"requests": {CPU_CAPACITY: str(CPUS_PER_NODE)}},
            "selectors": [{"cel": {"expression": selector}}],
        },
    }


def node_cpus(node: int) -> CPUSet:
    return CPUSet.of(next(n.cpus for n in SPEC.nodes if n.id == node))


def health(pod: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """allocatedResourcesStatus: container -> resource name -> its devices' health."""
    return {
        c["name"]: {s["name"]: s["resources"] for s in c.get("allocatedResourcesStatus") or []}
        for c in pod.get("status", {}).get("containerStatuses", [])
    }


def test_claim_over_both_numa_nodes_is_pinned_and_its_health_reported(
    guest_kubelet: GuestKubeletNode, namespace: str
) -> None:
    node, kube = guest_kubelet, guest_kubelet.kube
    # The shape of hack/examples/claim-cpu-capacity-20.yaml (one request per NUMA node), on the guest's scale.
    claim = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "two-nodes"},
        "spec": {"devices": {"requests": [numa_request("numa0", 0), numa_request("numa1", 1)]}},
    }
    pod = pinned_pod(busybox_pod("app", {"cpus": "two-nodes"}), node.name)
    [app] = pod["spec"]["containers"]
    # `app` names each request, `whole` the whole claim: the kubelet keys device health by CDI device, and dra-cpu
    # gives a claim one CDI device for all its devices, so `whole` sees one device's health for both.
    app["resources"]["claims"] = [{"name": "cpus", "request": "numa0"}, {"name": "cpus", "request": "numa1"}]
    pod["spec"]["containers"].append({**app, "name": "whole", "resources": {"claims": [{"name": "cpus"}]}})
    create_all(kube, namespace, [claim, pod])
    bound = wait_running(node.kube, namespace, "app", RUNNING_SECONDS, details=node.describe)
    assert bound["spec"]["nodeName"] == node.name

    # The scheduler's allocation: each request on its node's device, with the CPUs it asked for.
    stored = kube.get(claim_path(namespace, "two-nodes"))
    uid = stored["metadata"]["uid"]
    results = {
        r["request"]: (r["driver"], r["pool"], r["device"], r.get("consumedCapacity", {}).get(CPU_CAPACITY))
        for r in stored["status"]["allocation"]["devices"]["results"]
    }
    assert results == {f"numa{n}": ("dra.cpu", node.name, f"cpu-numa{n}", str(CPUS_PER_NODE)) for n in (0, 1)}, results
    # The driver's CPUs for each: whole cores of that node (SMT siblings), never the isolated CPU.
    record = node.checkpoint_claims()[uid]
    granted = {d["device"]: CPUSet.parse(d["cpus"]) for d in record["devices"]}
    assert set(granted) == {"cpu-numa0", "cpu-numa1"}, record
    for n in (0, 1):
        mine = granted[f"cpu-numa{n}"]
        assert len(mine) == CPUS_PER_NODE and mine.issubset(node_cpus(n)), granted
        assert mine == CPUSet.of(SPEC.siblings_of(mine.first())), granted
    cpus = granted["cpu-numa0"] | granted["cpu-numa1"]
    assert not cpus & CPUSet.of(SPEC.isolated_cpus)

    # Both containers run there, as the guest kernel has it: their first processes and their cgroups.
    mems = CPUSet.of(SPEC.memory_nodes)  # a claim of CPUs only: every node with memory (docs/user.md)
    for name in ("app", "whole"):
        container = container_id(bound, name)
        assert node.allowed(container) == Allowed(cpus, mems), name
        assert node.cpuset(container) == (cpus, mems), name
    container = container_id(bound, "app")

    resource = f"dra.cpu/cpu=claim-{uid}"
    healthy = {"health": "Healthy", "resourceID": resource}
    all_healthy = {
        "app": {"claim:cpus/numa0": [healthy], "claim:cpus/numa1": [healthy]},
        "whole": {"claim:cpus": [healthy]},
    }
    wait_until(lambda: health(kube.get(f"/api/v1/namespaces/{namespace}/pods/app")) == all_healthy,
             "both devices Healthy in the pod's allocatedResourcesStatus", HEALTH_SECONDS, 1)  # fmt: skip

    # A CPU of the numa1 device goes offline (never CPU 0, which x86 cannot take offline).
    victim = max(granted["cpu-numa1"])
    gone = CPUSet.of([victim])
    unhealthy = {
        "health": "Unhealthy",
        "resourceID": resource,
        "message": f"CPUs {gone} are offline (prepared claims hold {gone})",
    }
    node.set_online(victim, False)
    try:
        wait_until(lambda: node.allowed(container).cpus == cpus - gone, "the kernel to take the CPU from the container")
        # `whole` shows the claim's first device (numa0's) only: the outage is not in its status (docs/limits.md).
        want = {
            "app": {"claim:cpus/numa0": [healthy], "claim:cpus/numa1": [unhealthy]},
            "whole": {"claim:cpus": [healthy]},
        }
        try:
            wait_until(lambda: health(kube.get(f"/api/v1/namespaces/{namespace}/pods/app")) == want,
                     f"the numa1 device Unhealthy with CPU {victim} offline", HEALTH_SECONDS, 1)  # fmt: skip
        except AssertionError as err:
            seen = health(kube.get(f"/api/v1/namespaces/{namespace}/pods/app"))
            raise AssertionError(f"{err}: {seen}\n{node.describe()}") from None
    finally:
        node.set_online(victim, True)
    # Back online: Healthy again, and the container has the CPU back (cgroup v2 restores it to its cpuset's tasks).
    wait_until(lambda: health(kube.get(f"/api/v1/namespaces/{namespace}/pods/app")) == all_healthy,
             "both devices Healthy again", HEALTH_SECONDS, 1)  # fmt: skip
    wait_until(lambda: node.allowed(container).cpus == cpus, "the container to get the CPU back")
