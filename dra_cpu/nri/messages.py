"""The NRI messages of a pin: what the runtime gets for a container (an adjustment at creation, an update later) and
what the plugin keeps of a container the runtime describes."""

from __future__ import annotations

from dra_cpu.core.entitlement import ContainerInfo, MemoryPolicy, Pin, container_info
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api


def adjustment(pin: Pin, memory_policy: bool, preferred_many: bool = True) -> api.ContainerAdjustment:
    """`memory_policy`: the runtime applies a LinuxMemoryPolicy (NRI 0.12+); a claimed container then gets its
    pin's policy. `preferred_many`: the kernel knows MPOL_PREFERRED_MANY (Linux 5.15+); without it a preference for
    several nodes is left to the kernel's local allocation, which the container's pinned CPUs make the same."""
    linux = api.LinuxContainerAdjustment(resources=_resources(pin))
    mode = _mode(pin.memory_policy, preferred_many) if memory_policy else None
    if pin.memory_policy is not None and mode is not None:
        linux.memory_policy.CopyFrom(api.LinuxMemoryPolicy(mode=mode, nodes=str(pin.memory_policy.nodes)))
    return api.ContainerAdjustment(linux=linux)


def _mode(policy: MemoryPolicy | None, preferred_many: bool) -> api.MpolMode.ValueType | None:
    if policy is None or not policy.nodes:
        return None
    if policy.binding is MemoryBinding.STRICT:
        return api.MPOL_BIND
    if len(policy.nodes) == 1:
        return api.MPOL_PREFERRED
    return api.MPOL_PREFERRED_MANY if preferred_many else None


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
