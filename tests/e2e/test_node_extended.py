"""DRA extended resources (KEP-5004, GA in 1.37) on the real node: dra-cpu upgraded by helm to deviceMode individual
with the chart's deviceClasses.extendedResourceName dra.cpu/cpu. A pod that asks `dra.cpu/cpu: 1` in its container's
resources and writes no claim runs on the CPU of the claim the scheduler wrote for it: the kubelet prepares that
claim, gives its CDI device to the container pod.status.extendedResourceClaimStatus maps to it, and NRI pins that
container, read back from its environment, from inside, from /proc and from its cgroup; a container of the pod that
does not ask runs on the shared pool. A CPU limit below what the container asks is refused at prepare, the CFS
check finding the container through the pod status."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.topology import Topology
from dra_cpu.tools.explain.classes import EXTENDED_RESOURCE
from tests.harness.cluster.chart import InstalledDriver
from tests.harness.cluster.objects import busybox_pod, claim_path
from tests.harness.cluster.pods import wait_prepare_refused, wait_running
from tests.harness.driver_files import checkpoint_claims
from tests.harness.nodes.real import RealNode
from tests.harness.poll import wait_until


@pytest.fixture(scope="module")
def extended_node(dra_cpu_node: InstalledDriver[RealNode]) -> Iterator[InstalledDriver[RealNode]]:
    with dra_cpu_node.reconfigured(
        {"config": {"deviceMode": "individual"}, "deviceClasses": {"extendedResourceName": EXTENDED_RESOURCE}},
        lambda devices: (
            bool(devices)
            and all(
                "dra.cpu/cpuID" in d["attributes"]
                for d in devices
                if d["attributes"]["dra.cpu/type"] == {"string": "cpu"}
            )
        ),
        "one device per CPU",
    ) as driver:
        wait_until(
            lambda: driver.node.kube.find("/apis/resource.k8s.io/v1/deviceclasses/dra.cpu.extended"),
            "the chart's DeviceClass dra.cpu.extended",
        )
        yield driver


def extended_pod(name: str, cpu: str = "1", sidecar: bool = False) -> dict[str, Any]:
    """Container `app` asks `dra.cpu/cpu: 1` and `cpu` (requests = limits); `sidecar` asks nothing."""
    pod = busybox_pod(name)
    [app] = pod["spec"]["containers"]
    amounts = {"cpu": cpu, EXTENDED_RESOURCE: "1"}
    app["resources"] = {"requests": amounts, "limits": amounts}
    if sidecar:
        pod["spec"]["containers"].append({**app, "name": "sidecar", "resources": {}})
    return pod


def test_the_container_that_asks_runs_on_the_claim_the_scheduler_wrote(
    extended_node: InstalledDriver[RealNode], namespace: str, topology: Topology
) -> None:
    node = extended_node.node
    kube = node.kube
    kube.create(extended_pod("ext", sidecar=True), namespace)
    pod = wait_running(kube, namespace, "ext")
    status = pod["status"]["extendedResourceClaimStatus"]
    assert [(m["containerName"], m["resourceName"]) for m in status["requestMappings"]] == [("app", EXTENDED_RESOURCE)]
    claim = kube.get(claim_path(namespace, status["resourceClaimName"]))
    uid = claim["metadata"]["uid"]
    [result] = claim["status"]["allocation"]["devices"]["results"]
    cpu = CPUSet.of([int(result["device"].removeprefix("cpu-"))])
    assert [d["cpus"] for d in checkpoint_claims(extended_node.state_dir)[uid]["devices"]] == [str(cpu)]
    seen = node.pinning(pod, "app")
    assert seen.claimed == {uid: cpu}, seen
    mems = topology.numa_nodes_of(cpu)
    assert (seen.inside, seen.init, seen.cgroup) == ((cpu, mems),) * 3, seen
    # The sidecar asked for nothing: no claim in its environment, the shared pool for its CPUs.
    shared = topology.online_cpus - cpu
    sidecar = node.wait_cpus(pod, shared, "the sidecar on the shared pool", container="sidecar")
    assert sidecar.claimed == {}, sidecar


def test_a_cpu_limit_below_what_the_container_asks_is_refused_at_prepare(
    extended_node: InstalledDriver[RealNode], namespace: str
) -> None:
    kube = extended_node.node.kube
    kube.create(extended_pod("tight", cpu="500m"), namespace)
    expected = (
        f"pod {namespace}/tight: container 'app' would be CFS-throttled to 0.5 CPUs "
        "(spec.containers[0].resources.limits.cpu 500m) on the 1 CPU claim 'tight-extended-resources-"
    )
    wait_prepare_refused(kube, namespace, "tight", expected)
