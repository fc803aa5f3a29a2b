"""The NRI messages of a pin: what the runtime gets for a container (an adjustment at creation, an update later) and
what the plugin keeps of a container the runtime describes."""

from __future__ import annotations

from dra_cpu.core.entitlement import ContainerInfo, Pin, container_info
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api

MEMORY_POLICY_MODE = api.MPOL_BIND


def adjustment(pin: Pin, memory_policy: bool) -> api.ContainerAdjustment:
    """`memory_policy`: the runtime applies a LinuxMemoryPolicy (NRI 0.12+); a claimed container then gets
    MPOL_BIND to its claim's NUMA nodes."""
    linux = api.LinuxContainerAdjustment(resources=_resources(pin))
    if memory_policy and pin.claims and pin.mems:
        linux.memory_policy.CopyFrom(api.LinuxMemoryPolicy(mode=MEMORY_POLICY_MODE, nodes=str(pin.mems)))
    return api.ContainerAdjustment(linux=linux)


def update(container_id: str, pin: Pin) -> api.ContainerUpdate:
    # A container may exit between our decision and the runtime's update: that must not fail the others.
    return api.ContainerUpdate(
        container_id=container_id, linux=api.LinuxContainerUpdate(resources=_resources(pin)), ignore_failure=True
    )


def _resources(pin: Pin) -> api.LinuxResources:
    resources = api.LinuxResources(cpu=api.LinuxCPU(cpus=str(pin.cpus), mems=str(pin.mems) if pin.mems else ""))
    resources.hugepage_limits.extend(api.HugepageLimit(page_size=s, limit=b) for s, b in pin.hugepage_limits)
    return resources


def info(container: api.Container, pod: api.PodSandbox | None) -> ContainerInfo:
    return container_info(
        container.id,
        container.name,
        pod.uid if pod is not None else "",
        f"{pod.namespace}/{pod.name}" if pod is not None else f"sandbox {container.pod_sandbox_id}",
        container.env,
    )
