"""Restarts and outages on the real node (see test_node_claims.py for the node): the driver's pod deleted (the
DaemonSet brings it back), the kubelet restarted, containerd restarted, and the driver up without its NRI connection
(enforcement required). Pinned pods keep their CPUs throughout, and the node keeps preparing claims afterwards."""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from dra_cpu.nri.enforcer import NriConfig
from tests.harness.cluster.chart import NAMESPACE, InstalledDriver
from tests.harness.cluster.client import Kube
from tests.harness.cluster.objects import busybox_pod, claim_path, cpu_claim
from tests.harness.cluster.pods import create_all, delete_pod, events, pod_path, wait_running
from tests.harness.driver_files import cdi_spec_uids, checkpoint_claims
from tests.harness.nodes.real import RealNode
from tests.harness.poll import wait_until

NRI_GRACE_SECONDS = NriConfig.grace_seconds


def pinned_and_shared(
    driver: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> tuple[dict[str, Any], CPUSet]:
    """A pod holding a 1-CPU claim and a pod without claims, both running; returns the shared one and the claim's
    CPUs."""
    kube, node = driver.node.kube, driver.node
    create_all(kube, namespace, [busybox_pod("shared"), cpu_claim("c"), busybox_pod("pinned", {"cpus": "c"})])
    shared = wait_running(kube, namespace, "shared")
    pinned = wait_running(kube, namespace, "pinned")
    uid = kube.get(claim_path(namespace, "c"))["metadata"]["uid"]
    cpus = CPUSet.parse(checkpoint_claims(driver.state_dir)[uid]["devices"][0]["cpus"])
    node.wait_cpus(pinned, cpus, "the pinned pod")
    node.wait_cpus(shared, topology.online_cpus - cpus, "the pod without claims")
    return shared, cpus


def still_pinned(
    driver: InstalledDriver[RealNode], namespace: str, topology: Topology, cpus: CPUSet, when: str
) -> None:
    kube, node = driver.node.kube, driver.node
    node.wait_cpus(kube.get(pod_path(namespace, "pinned")), cpus, f"the pinned pod {when}")
    node.wait_cpus(kube.get(pod_path(namespace, "shared")), topology.online_cpus - cpus, f"the shared pod {when}")


def node_still_prepares(driver: InstalledDriver[RealNode], namespace: str, topology: Topology, cpus: CPUSet) -> None:
    """A new pod without claims gets the shared pool; once the pinned pod is gone (its claim unprepared), a new
    claim's pod runs on a CPU."""
    kube, node = driver.node.kube, driver.node
    create_all(kube, namespace, [busybox_pod("new-shared")])
    node.wait_cpus(wait_running(kube, namespace, "new-shared"), topology.online_cpus - cpus, "a new pod without claims")
    uid = kube.get(claim_path(namespace, "c"))["metadata"]["uid"]
    delete_pod(kube, namespace, "pinned")
    assert uid not in checkpoint_claims(driver.state_dir)
    assert uid not in cdi_spec_uids(node.cdi_dir)
    create_all(kube, namespace, [cpu_claim("c2"), busybox_pod("pinned2", {"cpus": "c2"})])
    pod = wait_running(kube, namespace, "pinned2")
    uid2 = kube.get(claim_path(namespace, "c2"))["metadata"]["uid"]
    node.wait_cpus(pod, CPUSet.parse(checkpoint_claims(driver.state_dir)[uid2]["devices"][0]["cpus"]), "a new claim")


def slices(kube: Kube, node: str) -> list[dict[str, Any]]:
    return kube.list("/apis/resource.k8s.io/v1/resourceslices", field_selector=f"spec.nodeName={node}")


def metric(driver: InstalledDriver[RealNode], name: str) -> float | None:
    with urllib.request.urlopen(f"{driver.metrics_url}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_deleting_the_driver_pod_keeps_pinned_pods(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    kube = dra_cpu_node.node.kube
    _, cpus = pinned_and_shared(dra_cpu_node, namespace, topology)
    old = dra_cpu_node.ready_pod()["metadata"]["name"]
    kube.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/{old}")
    dra_cpu_node.ready_pod(other_than=old)
    still_pinned(dra_cpu_node, namespace, topology, cpus, "after the driver pod was replaced")
    node_still_prepares(dra_cpu_node, namespace, topology, cpus)


def test_kubelet_restart_keeps_slices_and_prepared_claims(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    node, kube = dra_cpu_node.node, dra_cpu_node.node.kube
    _, cpus = pinned_and_shared(dra_cpu_node, namespace, topology)
    before = {s["metadata"]["uid"] for s in slices(kube, node.name)}
    assert before
    log_size = node.log.stat().st_size
    node.restart_kubelet()
    # A starting kubelet deletes its node's slices; the driver sees it and publishes them again.
    wait_until(
        lambda: (now := {s["metadata"]["uid"] for s in slices(kube, node.name)}) and now != before,
        "the driver's slices to be published again after the kubelet's restart",
        90,
    )
    # The plugin registered again with the new kubelet, which connected to it.
    connected = re.compile(r'"Connection changed".*driverName="dra\.cpu".*connected=true')
    wait_until(
        lambda: connected.search(node.log.read_bytes()[log_size:].decode(errors="replace")),
        "the plugin to register with the restarted kubelet",
        90,
    )
    still_pinned(dra_cpu_node, namespace, topology, cpus, "after the kubelet restarted")
    node_still_prepares(dra_cpu_node, namespace, topology, cpus)


def test_containerd_restart_restores_pins(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    node = dra_cpu_node.node
    _, cpus = pinned_and_shared(dra_cpu_node, namespace, topology)
    node.runtime.restart()
    node.wait_ready()
    # The driver reconnects to the new NRI socket; its Synchronize brings every container to the state's pins.
    wait_until(lambda: metric(dra_cpu_node, "dra_cpu_nri_connected") == 1.0, "the NRI connection to be back", 90)
    still_pinned(dra_cpu_node, namespace, topology, cpus, "after containerd restarted")
    node_still_prepares(dra_cpu_node, namespace, topology, cpus)


def test_a_claim_that_cannot_be_prepared_shows_the_drivers_error_and_starts_later(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    """Enforcement down: containerd restarted without NRI, so dra-cpu loses its NRI connection and, after its grace
    period, refuses to prepare rather than hand out CPUs it cannot pin. The kubelet shows the driver's reason in the
    pod's events and retries; once containerd has NRI again the driver reconnects and the pod starts, pinned."""
    node, kube = dra_cpu_node.node, dra_cpu_node.node.kube
    try:
        node.runtime.restart(nri=False)
        node.wait_ready()
        wait_until(lambda: metric(dra_cpu_node, "dra_cpu_nri_connected") == 0.0, "the NRI connection to be lost", 60)
        # Within its grace period the driver still prepares (a runtime restart is short); past it, it refuses. The
        # grace is not visible from outside, so wait it out.
        time.sleep(NRI_GRACE_SECONDS + 2)
        create_all(kube, namespace, [cpu_claim("c"), busybox_pod("p", {"cpus": "c"})])

        def refused() -> list[str] | None:
            found = [e for e in events(kube, namespace, "p") if "not enforced" in e]
            return found or None

        (first, *_) = wait_until(refused, "the driver's refusal in the pod's events", 120)
        assert first.startswith("FailedPrepareDynamicResources: "), first
        assert "CPU pinning is not enforced: no NRI connection to the container runtime" in first, first
        assert kube.get(pod_path(namespace, "p"))["status"]["phase"] == "Pending"
    finally:
        node.runtime.restart(nri=True)
        node.wait_ready()
    wait_until(lambda: metric(dra_cpu_node, "dra_cpu_nri_connected") == 1.0, "the NRI connection to be back", 90)
    pod = wait_running(kube, namespace, "p", timeout=180)
    uid = kube.get(claim_path(namespace, "c"))["metadata"]["uid"]
    cpus = CPUSet.parse(checkpoint_claims(dra_cpu_node.state_dir)[uid]["devices"][0]["cpus"])
    node.wait_cpus(pod, cpus, "the pod started once enforcement was back")
