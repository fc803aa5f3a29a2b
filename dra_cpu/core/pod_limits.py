"""The limit the kubelet gives a claimed container for one resource (cpu, memory), read from its pod. Pure.

As the 1.37 kubelet computes it (kuberuntime's container resources), for resource R:
- the container's own limits.R L: L, plus what node-allocatable-mapped claims (KEP-5517) add for R to the containers
  the pod's status lists for them; the kubelet adds them to an explicit limit only;
- no container limit but a pod-level limits.R P (PodLevelResources): P, with nothing added;
- neither: no limit.
The containers that use a claim list one of the pod's names for it in resources.claims, or, for the claim the
scheduler wrote for the pod's DRA extended resources (KEP-5004: `dra.cpu/cpu: 4` in a container's resources), are
named in pod.status.extendedResourceClaimStatus.requestMappings.
core/cpu_quota.py and core/memory_limit.py check these limits against what a claim pins or binds a container to. A
pod resized in place later (InPlacePodVerticalScaling) is not seen: prepare runs once per claim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from dra_cpu.core.objects import At
from dra_cpu.errors import DraCpuError


class PodLimitsError(DraCpuError):
    """The pod's limits do not fit a claim of it: a CPU quota below its CPUs, a memory limit above the memory it is
    bound to; or a limit that is not a quantity."""


@dataclass(frozen=True)
class Limit:
    """A container's limit of one resource (CPUs or bytes), and where it comes from (for messages)."""

    amount: Fraction
    field: str
    written: str
    mapped: Fraction = Fraction(0)
    """What node-allocatable-mapped claims added to the container's own limit."""

    def describe(self, show: Callable[[Fraction], str]) -> str:
        """`spec.containers[0].resources.limits.cpu 500m + 2 node-allocatable`, the amount added as `show` writes it."""
        return f"{self.field} {self.written}" + (f" + {show(self.mapped)} node-allocatable" if self.mapped else "")


def number(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):g}"


@dataclass(frozen=True)
class ClaimedContainer:
    """A container of the pod that uses the claim being prepared."""

    at: At
    name: str
    spec: Mapping[str, Any]
    pod: Mapping[str, Any]

    @property
    def source(self) -> str:
        return self.at.source

    def limit(self, resource: str) -> Limit | None:
        """The container's limit of `resource` as the kubelet sets it, or None for no limit."""
        top = At(self.at.source, "", self.at.error)
        own = _limit(self.spec, self.at, resource)
        if own is not None:
            mapped = _mapped(self.pod, top, self.name, resource)
            return Limit(own.amount + mapped, own.field, own.written, mapped)
        return _limit(top.mapping(self.pod.get("spec")), top / "spec", resource)


def claim_containers(pod: Mapping[str, Any], claim: str) -> Iterator[ClaimedContainer]:
    """The containers (init containers first) of `pod` that use the ResourceClaim named `claim`."""
    metadata = At("pod").mapping(pod.get("metadata"))
    at = At(f"pod {metadata.get('namespace')}/{metadata.get('name')}", "", PodLimitsError)
    names = _pod_claim_names(pod, at, claim)
    extended = _extended_resource_containers(pod, at, claim)
    spec = at.mapping(pod.get("spec"))
    for field in ("initContainers", "containers"):
        for where, raw in (at / "spec" / field).items(spec.get(field)):
            container = where.mapping(raw, optional=False)
            name = str(container.get("name"))
            resources = where / "resources"
            refs = (resources / "claims").list(resources.mapping(container.get("resources")).get("claims"))
            if name in extended or names & {str(ref.get("name")) for ref in refs if isinstance(ref, Mapping)}:
                yield ClaimedContainer(where, name, container, pod)


def _extended_resource_containers(pod: Mapping[str, Any], at: At, claim: str) -> set[str]:
    """The containers mapped to the pod's extended-resource claim, when that is `claim`."""
    where = at / "status" / "extendedResourceClaimStatus"
    status = where.mapping(at.mapping(pod.get("status")).get("extendedResourceClaimStatus"))
    if status.get("resourceClaimName") != claim:
        return set()
    return {
        str(mapping.get("containerName"))
        for _, mapping in (where / "requestMappings").items(status.get("requestMappings"))
        if isinstance(mapping, Mapping)
    }


def _pod_claim_names(pod: Mapping[str, Any], at: At, claim: str) -> set[str]:
    """The pod's names (spec.resourceClaims[].name) for the ResourceClaim `claim`, named directly or made from a
    template (then the claim's name is in status.resourceClaimStatuses)."""
    made = {
        str(entry.get("name")): entry.get("resourceClaimName")
        for _, entry in (at / "status" / "resourceClaimStatuses").items(
            at.mapping(pod.get("status")).get("resourceClaimStatuses")
        )
        if isinstance(entry, Mapping)
    }
    names = set()
    for where, entry in (at / "spec" / "resourceClaims").items(at.mapping(pod.get("spec")).get("resourceClaims")):
        name = where.string(where.mapping(entry).get("name"))
        if entry.get("resourceClaimName", made.get(name)) == claim:
            names.add(name)
    return names


def _mapped(pod: Mapping[str, Any], at: At, container: str, resource: str) -> Fraction:
    """What the kubelet adds to the container's limit of `resource` for node-allocatable-mapped claims."""
    total = Fraction(0)
    statuses = at / "status" / "nodeAllocatableResourceClaimStatuses"
    for where, status in statuses.items(at.mapping(pod.get("status")).get("nodeAllocatableResourceClaimStatuses")):
        status = where.mapping(status, optional=False)
        if container not in (where / "containers").list(status.get("containers")):
            continue
        for entry_at, entry in (where / "mapping").items(status.get("mapping")):
            if isinstance(entry, Mapping) and entry.get("name") == resource and entry.get("quantity") is not None:
                total += (entry_at / "quantity").quantity(entry["quantity"])
        for entry_at, entry in (where / "overhead").items(status.get("overhead")):
            if isinstance(entry, Mapping) and entry.get("name") == resource:
                for key in ("perPod", "perContainer"):
                    if entry.get(key) is not None:
                        total += (entry_at / key).quantity(entry[key])
    return total


def _limit(owner: Mapping[str, Any], at: At, resource: str) -> Limit | None:
    """resources.limits.<resource> of a container or a pod spec; None when unset or 0."""
    resources = at / "resources"
    limits = resources / "limits"
    raw = limits.mapping(resources.mapping(owner.get("resources")).get("limits")).get(resource)
    if raw is None or (value := (limits / resource).quantity(raw)) <= 0:
        return None
    return Limit(value, (limits / resource).path, str(raw))
