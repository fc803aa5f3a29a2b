"""Will the CFS quota the kubelet gives a container let it use the CPUs its claim pins it to? Pure.

The kubelet turns limits.cpu into a CFS quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`). A container pinned to
N exclusive CPUs with a quota of fewer is throttled on CPUs no one else may use: the claim wastes them and the
workload runs slower than it would without one. So prepare refuses such a pod instead of pinning it.

The quota, as the 1.37 kubelet computes it (kuberuntime's container resources):
- the container's own limits.cpu L: a quota of L, plus the CPUs of node-allocatable-mapped claims (KEP-5517) that
  the pod's status lists for the container; the kubelet adds them to an explicit limit only;
- no container limit but a pod-level limits.cpu P (PodLevelResources): a quota of P, with nothing added;
- neither: no quota.
The containers that use a claim list one of the pod's names for it in resources.claims, or, for the claim the
scheduler wrote for the pod's DRA extended resources (KEP-5004: `dra.cpu/cpu: 4` in a container's resources), are
named in pod.status.extendedResourceClaimStatus.requestMappings.
A pod resized in place later (InPlacePodVerticalScaling) is not seen here: prepare runs once per claim.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from dra_cpu.core.objects import At
from dra_cpu.errors import DraCpuError

CPU = "cpu"


class ThrottledClaim(DraCpuError):
    """The pod's CPU limits would throttle a container below the CPUs its claim pins it to."""


@dataclass(frozen=True)
class Quota:
    """A container's CFS quota in CPUs, and where it comes from (for the message)."""

    cpus: Fraction
    limit_field: str
    limit: str
    mapped: Fraction = Fraction(0)


def _number(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):g}"


def _cpus(value: Fraction) -> str:
    return f"{_number(value)} CPU{'' if value == 1 else 's'}"


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


def _containers(spec: Mapping[str, Any], at: At) -> Iterator[tuple[At, Mapping[str, Any]]]:
    for field in ("initContainers", "containers"):
        for where, container in (at / field).items(spec.get(field)):
            yield where, where.mapping(container, optional=False)


def _mapped_cpus(pod: Mapping[str, Any], at: At, container: str) -> Fraction:
    """The CPUs the kubelet adds to the container's limit for node-allocatable-mapped claims."""
    total = Fraction(0)
    statuses = at / "status" / "nodeAllocatableResourceClaimStatuses"
    for where, status in statuses.items(at.mapping(pod.get("status")).get("nodeAllocatableResourceClaimStatuses")):
        status = where.mapping(status, optional=False)
        if container not in (where / "containers").list(status.get("containers")):
            continue
        for entry_at, entry in (where / "mapping").items(status.get("mapping")):
            if isinstance(entry, Mapping) and entry.get("name") == CPU and entry.get("quantity") is not None:
                total += (entry_at / "quantity").quantity(entry["quantity"])
        for entry_at, entry in (where / "overhead").items(status.get("overhead")):
            if isinstance(entry, Mapping) and entry.get("name") == CPU:
                for key in ("perPod", "perContainer"):
                    if entry.get(key) is not None:
                        total += (entry_at / key).quantity(entry[key])
    return total


def container_quota(pod: Mapping[str, Any], container: Mapping[str, Any], where: At) -> Quota | None:
    """The CFS quota the kubelet sets for `container` (found at `where` in `pod`), or None for no quota."""
    at = At(where.source, "", where.error)
    own = _cpu_limit(container, where)
    if own is not None:
        field, raw, limit = own
        mapped = _mapped_cpus(pod, at, str(container.get("name")))
        return Quota(limit + mapped, field, raw, mapped)
    pod_level = _cpu_limit(at.mapping(pod.get("spec")), at / "spec")
    if pod_level is not None:
        field, raw, limit = pod_level
        return Quota(limit, field, raw)
    return None


def _cpu_limit(owner: Mapping[str, Any], at: At) -> tuple[str, str, Fraction] | None:
    """resources.limits.cpu of a container or a pod spec: (field path, as written, CPUs), None when unset or 0."""
    resources = at / "resources"
    limits = resources / "limits"
    raw = limits.mapping(resources.mapping(owner.get("resources")).get("limits")).get(CPU)
    if raw is None or (value := (limits / CPU).quantity(raw)) <= 0:
        return None
    return (limits / CPU).path, str(raw), value


def throttled(pod: Mapping[str, Any], claim: str, cpus: int) -> list[str]:
    """One message per container of `pod` that uses the ResourceClaim named `claim` (pinned to its `cpus` CPUs)
    and whose quota is smaller; empty when none is."""
    metadata = At("pod").mapping(pod.get("metadata"))
    at = At(f"pod {metadata.get('namespace')}/{metadata.get('name')}", "", ThrottledClaim)
    names = _pod_claim_names(pod, at, claim)
    extended = _extended_resource_containers(pod, at, claim)
    problems = []
    for where, container in _containers(at.mapping(pod.get("spec")), at / "spec"):
        resources = where / "resources"
        refs = (resources / "claims").list(resources.mapping(container.get("resources")).get("claims"))
        uses = names & {str(ref.get("name")) for ref in refs if isinstance(ref, Mapping)}
        if not uses and str(container.get("name")) not in extended:
            continue
        quota = container_quota(pod, container, where)
        if quota is None or quota.cpus >= cpus:
            continue
        added = f" + {_number(quota.mapped)} node-allocatable" if quota.mapped else ""
        problems.append(
            f"{at.source}: container {container.get('name')!r} would be CFS-throttled to {_cpus(quota.cpus)} "
            f"({quota.limit_field} {quota.limit}{added}) on the {_cpus(Fraction(cpus))} claim {claim!r} pins it "
            f"to; raise that limit to at least {_number(cpus - quota.mapped)}, or remove it"
        )
    return problems
