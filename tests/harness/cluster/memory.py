"""Memory per NUMA node on a cluster's node (issue 23): claims of a node's memory (and CPUs) as users write them, the
pods that use them, and what the node's ResourceSlices publish."""

from __future__ import annotations

from typing import Any

from dra_cpu.core.quantity import parse_quantity
from tests.harness.cluster.client import Kube
from tests.harness.cluster.objects import CPU_CAPACITY, DRIVER, busybox_pod

MEMORY_CAPACITY = f"{DRIVER}/memory"
SLICES = "/apis/resource.k8s.io/v1/resourceslices"


def on_numa_node(node: int) -> list[dict[str, Any]]:
    return [{"cel": {"expression": f'device.attributes["resource.kubernetes.io"].numaNode == {node}'}}]


def numa_claim(name: str, numa: int, cpus: int = 0, memory: int = 0) -> dict[str, Any]:
    """A claim of `cpus` CPUs and `memory` bytes of NUMA node `numa` (a request for each that is not 0)."""
    requests = [
        {
            "name": request,
            "exactly": {
                "deviceClassName": device_class,
                "capacity": {"requests": {capacity: str(amount)}},
                "selectors": on_numa_node(numa),
            },
        }
        for request, device_class, capacity, amount in (
            ("cpus", DRIVER, CPU_CAPACITY, cpus),
            ("memory", f"{DRIVER}.memory", MEMORY_CAPACITY, memory),
        )
        if amount
    ]
    spec = {"devices": {"requests": requests}}
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": name}, "spec": spec}


def memory_pod(name: str, memory: int) -> dict[str, Any]:
    """A busybox pod using claim `name`, with a memory request and limit of `memory` bytes (none when 0): a strict
    claim's containers must not be able to outgrow it (prepare refuses them otherwise)."""
    pod = busybox_pod(name, {"numa": name})
    if memory:
        [app] = pod["spec"]["containers"]
        app["resources"]["limits"] = app["resources"]["requests"] = {"memory": str(memory)}
    return pod


def published_memory(kube: Kube, node: str) -> dict[int, int]:
    """NUMA node -> the capacity of its memory device, as the API server has the node's slices."""
    found = {}
    for stored in kube.list(SLICES, field_selector=f"spec.nodeName={node},spec.driver={DRIVER}"):
        for device in stored["spec"].get("devices", []):
            if device["attributes"][f"{DRIVER}/type"]["string"] == "memory":
                numa = device["attributes"]["resource.kubernetes.io/numaNode"]["int"]
                found[numa] = int(parse_quantity(device["capacity"][MEMORY_CAPACITY]["value"]))
    return found
