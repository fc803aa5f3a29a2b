"""CPU limits of claimed containers on the real node (kubelet 1.37, containerd, dra-cpu installed by helm): the CFS
quota the kubelet gives a claimed container, read from its cgroup on the host; the prepare error a pod gets when its
own limit would throttle it below its claim; and, with the KEP-5517 node-allocatable mapping on, the claim's CPUs in
the container's quota and in the pod cgroup's CPU weight, which the kubelet takes from the pod's status."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest

from tests.harness.cluster.chart import InstalledDriver
from tests.harness.cluster.objects import busybox_pod, claim_path, cpu_claim
from tests.harness.cluster.pods import create_all, delete_pod, events, pod_path, wait_running
from tests.harness.driver_files import cdi_spec_uids, checkpoint_claims
from tests.harness.nodes.kubelet import container_id
from tests.harness.nodes.real import RealNode
from tests.harness.poll import wait_until


def limited_pod(name: str, claim: str, cpu: str | None) -> dict[str, Any]:
    """A pod whose one container uses `claim` and, unless `cpu` is None, has limits.cpu (and so requests.cpu) `cpu`."""
    pod = busybox_pod(name, {"cpus": claim})
    if cpu is not None:
        pod["spec"]["containers"][0]["resources"]["limits"] = {"cpu": cpu}
    return pod


def run_claimed(
    driver: InstalledDriver[RealNode], namespace: str, name: str, cpu: str | None
) -> tuple[dict[str, Any], str]:
    """A 1-CPU claim and a pod using it, once Running: the pod and its container's runtime id."""
    create_all(driver.node.kube, namespace, [cpu_claim(name), limited_pod(name, name, cpu)])
    pod = wait_running(driver.node.kube, namespace, name)
    return pod, container_id(pod)


@pytest.mark.parametrize(("cpu", "quota"), [(None, None), ("1", Fraction(1)), ("1500m", Fraction(3, 2))])
def test_a_claimed_container_gets_the_quota_of_its_limit(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str, cpu: str | None, quota: Fraction | None
) -> None:
    node = dra_cpu_node.node
    _, cid = run_claimed(dra_cpu_node, namespace, "claimed", cpu)
    assert node.host_cpu_quota(cid) == quota
    # ... on the claim's CPU, as the checkpoint has it.
    uid = node.kube.get(claim_path(namespace, "claimed"))["metadata"]["uid"]
    [device] = checkpoint_claims(dra_cpu_node.state_dir)[uid]["devices"]
    assert node.host_cpuset(cid)[0] == device["cpus"]
    delete_pod(node.kube, namespace, "claimed")


def test_a_limit_below_the_claim_is_refused_at_prepare_and_nothing_is_pinned(
    dra_cpu_node: InstalledDriver[RealNode], namespace: str
) -> None:
    kube = dra_cpu_node.node.kube
    create_all(kube, namespace, [cpu_claim("tight"), limited_pod("tight", "tight", "500m")])
    expected = (
        f"pod {namespace}/tight: container 'app' would be CFS-throttled to 0.5 CPUs "
        "(spec.containers[0].resources.limits.cpu 500m) on the 1 CPU claim 'tight' pins it to; "
        "raise that limit to at least 1, or remove it"
    )
    seen = wait_until(
        lambda: [e for e in events(kube, namespace, "tight") if expected in e] or None,
        "the driver's refusal in the pod's events",
        90,
    )
    assert seen[0].startswith("FailedPrepareDynamicResources: "), seen
    uid = kube.get(claim_path(namespace, "tight"))["metadata"]["uid"]
    assert kube.get(pod_path(namespace, "tight"))["status"]["phase"] == "Pending"
    assert uid not in checkpoint_claims(dra_cpu_node.state_dir)
    assert uid not in cdi_spec_uids(dra_cpu_node.node.cdi_dir)


@pytest.fixture
def mapped_node(dra_cpu_node: InstalledDriver[RealNode]) -> Iterator[InstalledDriver[RealNode]]:
    """The driver upgraded (helm upgrade) to publish the node-allocatable mapping; back to the default afterwards."""
    kube = dra_cpu_node.node.kube

    def mapping_published(on: bool) -> bool:
        slices = kube.list("/apis/resource.k8s.io/v1/resourceslices", field_selector="spec.driver=dra.cpu")
        devices = [d for s in slices for d in s["spec"].get("devices", [])]
        return bool(devices) and all(("nodeAllocatableResources" in d) == on for d in devices)

    def switch(on: bool) -> None:
        values = dict(dra_cpu_node.values)
        values["config"] = {**values.get("config", {}), "publishNodeAllocatableResources": on}
        old = dra_cpu_node.ready_pod()["metadata"]["name"]
        dra_cpu_node.upgrade(values)
        dra_cpu_node.ready_pod(other_than=old)
        wait_until(lambda: mapping_published(on), f"slices {'with' if on else 'without'} the mapping", 120)

    switch(True)
    try:
        yield dra_cpu_node
    finally:
        switch(False)


def test_with_the_mapping_the_kubelet_adds_the_claim_to_quota_and_pod_weight(
    mapped_node: InstalledDriver[RealNode], namespace: str
) -> None:
    """The pod refused above runs: its 500m limit plus the claim's mapped CPU is a quota of 1.5 CPUs, and the pod
    cgroup weighs 500m + 1 CPU (1536 shares), although the spec asks 500m only."""
    node = mapped_node.node
    pod, cid = run_claimed(mapped_node, namespace, "mapped", "500m")
    [status] = pod["status"]["nodeAllocatableResourceClaimStatuses"]
    assert status["resourceClaimName"] == "mapped" and status["containers"] == ["app"], status
    assert status["mapping"] == [{"name": "cpu", "quantity": "1"}], status
    assert node.host_cpu_quota(cid) == Fraction(3, 2)
    assert node.host_pod_cpu_shares(cid) == 1536
    delete_pod(node.kube, namespace, "mapped")
