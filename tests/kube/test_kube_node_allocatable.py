"""KEP-5517 against the real kube-scheduler 1.37 (DRANodeAllocatableResources on): with the driver's
nodeAllocatableResources mapping, a claim's CPUs count against the Node's allocatable CPUs although the pod does not
repeat them in its requests, and such a claim cannot be shared across pods."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from dra_cpu.core.devices import DeviceConfig, build_devices
from dra_cpu.kube.apiserver import connect
from dra_cpu.kube.publisher import SlicePublisher
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.explain.classes import chart_device_classes
from tests.harness.cluster.client import Kube
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.objects import (
    busybox_pod,
    cpu_claim,
    create_node,
    delete_node,
    ensure,
    new_namespace,
    pinned_pod,
)
from tests.harness.cluster.pods import pod_scheduled_condition, wait_allocated, wait_scheduled
from tests.harness.paths import SYSFS
from tests.harness.poll import wait_until

LOG = logging.getLogger("test.node-allocatable")
NODE_CPUS = 16  # dual-socket-smt2: two NUMA nodes of 8 CPUs


@pytest.fixture
def mapped_node(control_plane: ControlPlane, admin: Kube) -> Iterator[str]:
    """A Node declaring DRANodeAllocatableResources (as a 1.37 kubelet with the gate does), with the driver's slices
    published with the mapping on."""
    ensure(admin, chart_device_classes())
    name = f"mapped-{id(admin):x}"
    topology = read_topology(SYSFS / "dual-socket-smt2")
    create_node(admin.api, name, cpus=NODE_CPUS, memory=16 << 30)
    client.CoreV1Api(admin.api).patch_node_status(
        name, {"status": {"declaredFeatures": ["DRANodeAllocatableResources"]}}
    )
    config = DeviceConfig(node_name=name, node_allocatable=True)
    kube = connect(str(control_plane.kubeconfig))
    try:
        publisher = SlicePublisher(kube, config, LOG)
        publisher.set_devices(build_devices(topology, config))
        assert publisher.sync_once() == 1
    finally:
        kube.close()
    yield name
    delete_node(admin.api, name)


def cpu_pod(name: str, cpus: str) -> dict[str, Any]:
    container = {"name": "app", "image": "busybox", "resources": {"requests": {"cpu": cpus}}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"containers": [container]}}


def unschedulable(admin: Kube, namespace: str, pod: str) -> dict[str, Any]:
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}"

    def given_up() -> dict[str, Any] | None:
        condition = pod_scheduled_condition(admin.get(path))
        return condition if condition and condition.get("reason") == "Unschedulable" else None

    return wait_until(given_up, f"the scheduler to give up on {pod}")


def test_a_claims_cpus_count_against_node_allocatable(admin: Kube, mapped_node: str) -> None:
    namespace = new_namespace(admin)
    admin.create(cpu_claim("two", "2"), namespace)
    admin.create(pinned_pod(busybox_pod("claimant", {"cpus": "two"}), mapped_node), namespace)
    assert wait_scheduled(admin, namespace, "claimant")["spec"]["nodeName"] == mapped_node
    assert wait_allocated(admin, namespace, "two")["status"]["allocation"]["devices"]["results"][0]["device"]
    # The claim's 2 CPUs are taken from the node's 16 although the claimant requests no cpu: 15 no longer fit.
    admin.create(pinned_pod(cpu_pod("greedy", str(NODE_CPUS - 1)), mapped_node), namespace)
    condition = unschedulable(admin, namespace, "greedy")
    assert "Insufficient cpu" in condition["message"], condition["message"]
    admin.create(pinned_pod(cpu_pod("fits", str(NODE_CPUS - 2)), mapped_node), namespace)
    assert wait_scheduled(admin, namespace, "fits")["spec"]["nodeName"] == mapped_node


def test_a_mapped_claim_is_not_shared_across_pods(admin: Kube, mapped_node: str) -> None:
    namespace = new_namespace(admin)
    admin.create(cpu_claim("one", "1"), namespace)
    admin.create(pinned_pod(busybox_pod("first", {"cpus": "one"}), mapped_node), namespace)
    wait_scheduled(admin, namespace, "first")
    admin.create(pinned_pod(busybox_pod("second", {"cpus": "one"}), mapped_node), namespace)
    condition = unschedulable(admin, namespace, "second")
    assert "cannot be shared" in condition["message"], condition["message"]
