"""The whole claim flow on a real node: kube-scheduler allocates, the real kubelet 1.37 calls NodePrepareResources
on dra-cpu (installed by `helm install` of charts/dra-cpu, image built by podman), containerd 2.1 applies the CDI
spec and asks dra-cpu over NRI, and the container runs on the claim's CPUs. Everything is read back from the cluster,
from the driver's files on the host and from inside the containers (CRI exec).

The examples of hack/examples are applied unchanged when they fit this machine; on the 2-CPU, one-NUMA-node test
machines none does (each asks 4 or more CPUs), so those that fit once scaled are applied with their CPU amounts cut to
what a claim can get here (1 CPU: one stays shared) and NUMA node 1 replaced by node 0 (tests/harness/examples.py),
and the others (isolated CPUs, hugepages, two NUMA nodes) are skipped with the reason.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from tests.harness.cluster.chart import InstalledDriver
from tests.harness.cluster.client import Kube
from tests.harness.cluster.objects import CPU_CAPACITY, busybox_pod, claim_path, cpu_claim, deployment
from tests.harness.cluster.pods import (
    RUNNING_SECONDS,
    create_all,
    delete_pod,
    events,
    pod_path,
    unschedulable,
    wait_running,
)
from tests.harness.driver_files import cdi_spec_uids, checkpoint_claims
from tests.harness.examples import DoesNotFit, documents, fit
from tests.harness.nodes.real import RealNode
from tests.harness.paths import EXAMPLES
from tests.harness.poll import NotYet, wait_until

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def claim_uid(kube: Kube, namespace: str, name: str) -> str:
    return str(kube.get(claim_path(namespace, name))["metadata"]["uid"])


def allocated_cpus(claim: dict[str, Any]) -> int:
    """CPUs the scheduler allocated to a claim: the dra.cpu/cpu capacity its results consumed."""
    results = claim["status"]["allocation"]["devices"]["results"]
    return sum(int(r.get("consumedCapacity", {}).get(CPU_CAPACITY, "0")) for r in results)


def assert_pinned(
    driver: InstalledDriver[RealNode], topology: Topology, pod: dict[str, Any], claims: dict[str, int]
) -> CPUSet:
    """The container runs on exactly its claims' CPUs, seen from its environment, from inside, from the host's /proc
    and from its cgroup, and its memory on their NUMA nodes; `claims` is claim UID -> CPUs allocated. Returns the
    CPUs."""
    seen = driver.node.pinning(pod)
    assert set(seen.claimed) == set(claims), seen
    for uid, count in claims.items():
        assert len(seen.claimed[uid]) == count, (uid, seen)
        record = checkpoint_claims(driver.state_dir)[uid]
        assert CPUSet.parse(",".join(d["cpus"] for d in record["devices"] if d["cpus"])) == seen.claimed[uid]
    cpus = CPUSet.of(c for s in seen.claimed.values() for c in s)
    mems = topology.numa_nodes_of(cpus)
    assert seen.inside == (cpus, mems), seen
    assert seen.init == (cpus, mems), seen
    assert seen.cgroup == (cpus, mems), seen
    assert set(seen.mems_env.values()) == {mems}, seen
    return cpus


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_example_runs_on_its_claims_cpus(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology, path: Path
) -> None:
    try:
        fitted = fit(documents(path), topology)
    except DoesNotFit as err:
        pytest.skip(f"{path.name}: {err}")
    kube = dra_cpu_node.node.kube
    create_all(kube, namespace, fitted.docs)
    pods = [d for d in fitted.docs if d["kind"] == "Pod"]
    for doc in pods:
        pod = wait_running(kube, namespace, doc["metadata"]["name"])
        assert pod["spec"]["nodeName"] == dra_cpu_node.node.name
        claims = {}
        for ref in pod["spec"]["resourceClaims"]:
            claim = kube.get(claim_path(namespace, ref["resourceClaimName"]))
            assert {r["driver"] for r in claim["status"]["allocation"]["devices"]["results"]} == {"dra.cpu"}
            claims[claim["metadata"]["uid"]] = allocated_cpus(claim)
        cpus = assert_pinned(dra_cpu_node, topology, pod, claims)
        assert set(claims) <= cdi_spec_uids(dra_cpu_node.node.cdi_dir)
        # The example's own command prints what it got.
        logs = dra_cpu_node.node.plane.kubectl("-n", namespace, "logs", doc["metadata"]["name"])
        assert f"Cpus_allowed_list:\t{cpus}" in logs.stdout, logs
    if fitted.changes:
        print(f"{path.name}: fitted to this machine: {', '.join(fitted.changes)}")


def test_containers_without_claims_shrink_to_the_shared_pool_and_regrow(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    kube, node = dra_cpu_node.node.kube, dra_cpu_node.node
    everything = topology.online_cpus
    create_all(kube, namespace, [busybox_pod("shared")])
    shared = wait_running(kube, namespace, "shared")
    node.wait_cpus(shared, everything, "a container without claims before any claim")
    create_all(kube, namespace, [cpu_claim("one-cpu"), busybox_pod("pinned", {"cpus": "one-cpu"})])
    pinned = wait_running(kube, namespace, "pinned")
    cpus = assert_pinned(dra_cpu_node, topology, pinned, {claim_uid(kube, namespace, "one-cpu"): 1})
    node.wait_cpus(shared, everything - cpus, "the container without claims once a claim holds CPUs")
    delete_pod(kube, namespace, "pinned")
    node.wait_cpus(shared, everything, "the container without claims once the claim's pod is gone")


def test_deleting_the_pod_unprepares_its_claim(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    kube, node = dra_cpu_node.node.kube, dra_cpu_node.node
    create_all(kube, namespace, [busybox_pod("shared"), cpu_claim("c"), busybox_pod("p", {"cpus": "c"})])
    shared = wait_running(kube, namespace, "shared")
    pod = wait_running(kube, namespace, "p")
    uid = claim_uid(kube, namespace, "c")
    assert uid in checkpoint_claims(dra_cpu_node.state_dir)
    assert uid in cdi_spec_uids(node.cdi_dir)
    cpus = assert_pinned(dra_cpu_node, topology, pod, {uid: 1})
    node.wait_cpus(shared, topology.online_cpus - cpus, "shared pool with the claim prepared")
    delete_pod(kube, namespace, "p")
    # The pod object is gone only after the kubelet's NodeUnprepareResources returned.
    assert uid not in checkpoint_claims(dra_cpu_node.state_dir)
    assert uid not in cdi_spec_uids(node.cdi_dir)
    node.wait_cpus(shared, topology.online_cpus, "shared pool after unprepare")

    # The claim itself stays (the user made it), deallocated and reserved for nobody.
    def released() -> bool:
        return not kube.get(claim_path(namespace, "c")).get("status", {}).get("reservedFor")

    wait_until(released, "the claim to be released")


def test_a_template_claim_is_released_with_its_pod(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    kube = dra_cpu_node.node.kube
    create_all(kube, namespace, [cpu_claim("t", template=True), busybox_pod("p", {"cpus": "t"}, template=True)])
    pod = wait_running(kube, namespace, "p")
    (status,) = pod["status"]["resourceClaimStatuses"]
    generated = status["resourceClaimName"]
    uid = claim_uid(kube, namespace, generated)
    assert_pinned(dra_cpu_node, topology, pod, {uid: 1})
    delete_pod(kube, namespace, "p")
    assert uid not in checkpoint_claims(dra_cpu_node.state_dir)
    assert uid not in cdi_spec_uids(dra_cpu_node.node.cdi_dir)
    # The resourceclaim controller deletes the claim it made for the pod.
    wait_until(lambda: kube.find(claim_path(namespace, generated)) is None, f"claim {generated} to be deleted")


def test_a_deployments_pod_runs_on_the_cpus_of_its_template_claim(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    """A Deployment as users write it: the deployment and replicaset controllers make its pod, the resourceclaim
    controller the pod's claim from its template, and the pod runs on that claim's CPUs."""
    kube = dra_cpu_node.node.kube
    pod = busybox_pod("app", {"cpus": "one-cpu"}, template=True)
    create_all(kube, namespace, [cpu_claim("one-cpu", template=True), deployment("app", pod)])
    pods_path = f"/api/v1/namespaces/{namespace}/pods"
    try:
        # Any of the Deployment's pods: the ReplicaSet may replace the first one it makes.
        def one_running() -> dict[str, Any] | NotYet:
            pods = kube.list(pods_path, label_selector="app=app")
            running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
            live = [p for p in running if not p["metadata"].get("deletionTimestamp")]
            return (
                live[0] if live else NotYet([(p["metadata"]["name"], p.get("status", {}).get("phase")) for p in pods])
            )

        running = wait_until(one_running, "a running pod of the Deployment", RUNNING_SECONDS)
        assert [o["kind"] for o in running["metadata"]["ownerReferences"]] == ["ReplicaSet"]
        (status,) = running["status"]["resourceClaimStatuses"]
        assert_pinned(dra_cpu_node, topology, running, {claim_uid(kube, namespace, status["resourceClaimName"]): 1})
    finally:
        # Else the ReplicaSet makes the pod again as the namespace's clean-up deletes it.
        kube.delete(f"/apis/apps/v1/namespaces/{namespace}/deployments/app")
        wait_until(
            lambda: not kube.list(pods_path, label_selector="app=app"), "the Deployment's pod to be deleted", 120
        )


@pytest.mark.parametrize(
    "selector",
    [
        "",
        'device.attributes["resource.kubernetes.io"].numaNode == 0',
        'device.attributes["dra.cpu"].numaNodeID == 0',
    ],
    ids=["capacity-only", "standard-numaNode", "dra.cpu-numaNodeID"],
)
def test_upstream_style_claims_work_unchanged(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology, selector: str
) -> None:
    """Claims as written for kubernetes-sigs/dra-driver-cpu: class dra.cpu, capacity.requests {dra.cpu/cpu: N},
    selectors on the standard NUMA attribute or on dra.cpu/numaNodeID."""
    kube = dra_cpu_node.node.kube
    name = f"upstream-{uuid.uuid4().hex[:6]}"
    create_all(kube, namespace, [cpu_claim(name, 1, selector), busybox_pod("p", {"cpus": name})])
    pod = wait_running(kube, namespace, "p")
    cpus = assert_pinned(dra_cpu_node, topology, pod, {claim_uid(kube, namespace, name): 1})
    assert topology.numa_nodes_of(cpus) == CPUSet.of([0])


def test_pod_status_shows_device_health(dra_cpu_node: InstalledDriver[RealNode], namespace: str) -> None:
    """With ResourceHealthStatus (beta in 1.37) the kubelet reads dra-cpu's health stream into each container's
    allocatedResourcesStatus: resource `claim:<pod claim name>`, one entry per CDI device, Healthy."""
    kube = dra_cpu_node.node.kube
    if not dra_cpu_node.node.feature_gates.get("ResourceHealthStatus"):
        pytest.skip("the kubelet has no ResourceHealthStatus gate")
    create_all(kube, namespace, [cpu_claim("c"), busybox_pod("p", {"cpus": "c"})])
    wait_running(kube, namespace, "p")
    uid = claim_uid(kube, namespace, "c")

    def health() -> list[dict[str, Any]] | None:
        pod = kube.get(f"/api/v1/namespaces/{namespace}/pods/p")
        found: list[dict[str, Any]] = pod["status"]["containerStatuses"][0].get("allocatedResourcesStatus") or []
        return found or None

    statuses = wait_until(health, "allocatedResourcesStatus in the pod's status", 60)
    assert statuses == [
        {"name": "claim:cpus", "resources": [{"resourceID": f"dra.cpu/cpu=claim-{uid}", "health": "Healthy"}]}
    ]


def test_what_the_node_cannot_grant_stays_pending_with_the_schedulers_reason(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    """Issue 21: the node publishes its CPUs but the one kept for containers without claims (minSharedCpus 1), so a
    claim it could not prepare is never allocated: the pod stays Pending with the scheduler's reason instead of
    being bound and stuck in ContainerCreating on a prepare error. On the 2-CPU test node: pod A holds a 1-CPU claim,
    the next 1-CPU claim waits; a 2-CPU claim waits on the empty node too. Once A is gone the waiting pod runs."""
    kube = dra_cpu_node.node.kube
    claimable = len(topology.online_cpus - topology.isolated_cpus) - 1
    create_all(kube, namespace, [cpu_claim("whole", claimable + 1), busybox_pod("too-big", {"cpus": "whole"})])
    message = unschedulable(kube, namespace, "too-big")
    assert "cannot allocate all claims" in message, message
    delete_pod(kube, namespace, "too-big")

    create_all(kube, namespace, [cpu_claim("a", claimable), busybox_pod("a", {"cpus": "a"})])
    wait_running(kube, namespace, "a")
    create_all(kube, namespace, [cpu_claim("b", 1), busybox_pod("b", {"cpus": "b"})])
    message = unschedulable(kube, namespace, "b")
    assert "cannot allocate all claims" in message, message
    pod = kube.get(pod_path(namespace, "b"))
    assert not pod["spec"].get("nodeName"), "never bound to the node"
    assert not kube.get(claim_path(namespace, "b")).get("status", {}).get("allocation"), "never allocated"
    assert not any("FailedPrepareDynamicResources" in e for e in events(kube, namespace, "b"))

    delete_pod(kube, namespace, "a")
    pod = wait_running(kube, namespace, "b")
    assert_pinned(dra_cpu_node, topology, pod, {claim_uid(kube, namespace, "b"): 1})
