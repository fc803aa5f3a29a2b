"""Memory per NUMA node on the real node (issue 23): the kubelet 1.37, kube-scheduler and containerd of this
machine (one NUMA node, two CPUs, one of which stays shared), dra-cpu installed by its chart.

Claims of memory only (the node's one claimable CPU would be the limit otherwise): the scheduler counts them
against the memory device the node publishes, the driver counts them again at prepare and binds the container's
memory to them; read back from the API server, the driver's checkpoint and the container's cgroup and /proc.
tests/guest/test_guest_memory.py does the same on two NUMA nodes, with CPUs.
"""

from __future__ import annotations

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.memory import MEMORY_STEP
from dra_cpu.core.topology import Topology
from tests.harness.cluster.chart import InstalledDriver
from tests.harness.cluster.memory import memory_pod, numa_claim, published_memory
from tests.harness.cluster.objects import claim_path
from tests.harness.cluster.pods import create_all, delete_pod, events, pod_path, unschedulable, wait_running
from tests.harness.driver_files import checkpoint_claims
from tests.harness.nodes.real import RealNode
from tests.harness.poll import wait_until

CLAIMED = 64 << 20


def test_memory_claims_are_counted_per_node_and_bound_there(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    node, kube = dra_cpu_node.node, dra_cpu_node.node.kube
    published = published_memory(kube, node.name)
    assert set(published) == {n.id for n in topology.numa_nodes if n.memory_bytes}, published
    free = published[0]
    assert free > CLAIMED

    create_all(kube, namespace, [numa_claim("bound", 0, memory=CLAIMED), memory_pod("bound", CLAIMED)])
    wait_running(kube, namespace, "bound")
    uid = kube.get(claim_path(namespace, "bound"))["metadata"]["uid"]
    record = checkpoint_claims(dra_cpu_node.state_dir)[uid]
    assert [d["memory"] for d in record["devices"]] == [{"numaNode": 0, "bytes": CLAIMED}], record
    pinning = node.pinning(kube.get(pod_path(namespace, "bound")))
    node0 = CPUSet.of([0])
    assert pinning.mems_env == {uid: node0}
    assert pinning.inside[1] == pinning.init[1] == pinning.cgroup[1] == node0

    # More than node 0 has left is never allocated: Pending with the scheduler's reason, not bound and OOM-killed.
    over = free - CLAIMED + MEMORY_STEP
    create_all(kube, namespace, [numa_claim("over", 0, memory=over), memory_pod("over", over)])
    message = unschedulable(kube, namespace, "over")
    assert "cannot allocate all claims" in message, message
    assert not kube.get(claim_path(namespace, "over")).get("status", {}).get("allocation"), "never allocated"

    # A pod whose memory limit exceeds what its claim binds it to is scheduled, and refused at prepare saying why.
    create_all(kube, namespace, [numa_claim("greedy", 0, memory=CLAIMED), memory_pod("greedy", 2 * CLAIMED)])
    refusal = (
        "container 'app' may use 128Mi of memory (spec.containers[0].resources.limits.memory 134217728), more than the "
        "64Mi on NUMA node(s) 0 claim 'greedy' binds it to"
    )
    wait_until(lambda: any(refusal in e for e in events(kube, namespace, "greedy")), "prepare to refuse greedy", 90)
    delete_pod(kube, namespace, "greedy")

    # Once the bound claim's pod is gone, the waiting claim fits node 0 and its pod runs.
    delete_pod(kube, namespace, "bound")
    wait_running(kube, namespace, "over")
