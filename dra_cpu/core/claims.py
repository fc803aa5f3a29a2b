"""ResourceClaim (a resource.k8s.io/v1 dict, as the API server returns it) -> ClaimRequest, validated. Pure.

Only the parts of the claim that concern this driver and this node are kept: the allocation results of our driver
and pool, what the scheduler recorded as consumed, our opaque configuration (`CPUConfig`: the placement policy and
the memory binding), and the pods the claim is reserved for.
Every error names the field path and the value, so that the message in the pod's events is actionable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.objects import At
from dra_cpu.errors import DraCpuError, shown

CONFIG_API_VERSION = "dra.cpu/v1alpha1"
CONFIG_KIND = "CPUConfig"
# Set by the resource claim controller on the claims it makes from a pod's ResourceClaimTemplate.
POD_CLAIM_NAME_ANNOTATION = "resource.kubernetes.io/pod-claim-name"
_CONFIG_FIELDS = {
    "wholeCores": "whole_cores",
    "alignL3": "align_l3",
    "spread": "spread",
    "distributeAcrossNUMA": "distribute_across_numa",
}
MEMORY_BINDING_FIELD = "memoryBinding"


class ClaimError(DraCpuError):
    """The claim cannot be prepared as it stands; retrying will not help until the claim or node changes."""


@dataclass(frozen=True)
class ClaimRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


# The API server gives every object a UUID; namespaces are DNS labels, ResourceClaim names DNS subdomains.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def ref_problem(namespace: str, name: str, uid: str) -> str:
    """Why a claim reference from a request cannot name a ResourceClaim, or "". The uid becomes CDI file and
    device names, so anything but a UUID (a newline, `..`, `/`, `=`, 300 characters) is refused here."""
    missing = [f for f, v in (("namespace", namespace), ("uid", uid), ("name", name)) if not v]
    if missing:
        return f"claim {shown(namespace)}/{shown(name)} (uid {shown(uid)}): empty {', '.join(missing)}"
    if not _UUID.fullmatch(uid):
        return f"claim {shown(namespace)}/{shown(name)}: uid {shown(uid)} is not a UUID"
    if not _DNS_LABEL.fullmatch(namespace):
        return f"claim uid {uid}: namespace {shown(namespace)} is not a DNS label"
    if len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        return f"claim uid {uid}: name {shown(name)} is not a DNS subdomain"
    return ""


@dataclass(frozen=True)
class CPUConfig:
    """The opaque configuration of a request (kind CPUConfig): where its CPUs go, and how the claim's memory is
    bound (None: the default for what the claim holds, core/ledger.PreparedClaim.binding)."""

    policy: AllocationPolicy = field(default_factory=AllocationPolicy)
    memory_binding: MemoryBinding | None = None


@dataclass(frozen=True)
class DeviceResult:
    request: str
    device: str
    pool: str
    share_id: str | None
    consumed: tuple[tuple[str, str], ...]
    policy: AllocationPolicy = field(default_factory=AllocationPolicy)
    memory_binding: MemoryBinding | None = None

    @property
    def base_request(self) -> str:
        """The kubelet matches containers' resources.claims[].request against the name before any `/subrequest`."""
        return self.request.split("/", 1)[0]

    def consumed_of(self, key: str) -> str | None:
        return dict(self.consumed).get(key)


@dataclass(frozen=True)
class PodRef:
    """A pod the claim is reserved for (status.reservedFor), in the claim's namespace."""

    name: str
    uid: str


@dataclass(frozen=True)
class ClaimRequest:
    ref: ClaimRef
    results: tuple[DeviceResult, ...]
    pods: tuple[PodRef, ...]
    # The pod's name for a claim made from its ResourceClaimTemplate (annotation resource.kubernetes.io/pod-claim-name);
    # None for a claim the pod names. Where containers find the claim's device metadata depends on it.
    pod_claim_name: str | None = None

    @property
    def pod_uids(self) -> tuple[str, ...]:
        return tuple(p.uid for p in self.pods)

    def request_names(self) -> dict[str, str]:
        """Base request name -> the name the allocation gave (`<request>/<subrequest>` for firstAvailable)."""
        return {r.base_request: r.request for r in self.results}


def allocated_claim_object(
    namespace: str,
    name: str,
    results: Sequence[Mapping[str, Any]],
    *,
    uid: str = "",
    pod_uids: Sequence[str] = (),
    config: Sequence[Mapping[str, Any]] = (),
    requests: Sequence[Mapping[str, Any]] = (),
    node: str = "",
) -> dict[str, Any]:
    """A ResourceClaim as the API server returns it once the scheduler allocated it (on `node`, when given) and
    reserved it for pods: what the demo, the benchmarks and the tests hand to the driver. `results` come from
    `allocation_result`."""
    allocation: dict[str, Any] = {
        "devices": {"results": [dict(r) for r in results], "config": [dict(c) for c in config]}
    }
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace, **({"uid": uid} if uid else {})},
        "spec": {"devices": {"requests": [dict(r) for r in requests]}},
        "status": {
            "allocation": allocation,
            "reservedFor": [{"resource": "pods", "name": f"pod-{i}", "uid": u} for i, u in enumerate(pod_uids)],
        },
    }


def allocation_result(
    driver: str,
    pool: str,
    device: str,
    *,
    request: str = "cpus",
    consumed: Mapping[str, str] | None = None,
    share_id: str = "",
) -> dict[str, Any]:
    """One entry of status.allocation.devices.results."""
    return {
        "request": request,
        "driver": driver,
        "pool": pool,
        "device": device,
        **({"shareID": share_id} if share_id else {}),
        **({"consumedCapacity": dict(consumed)} if consumed else {}),
    }


def parse_claim(
    obj: Mapping[str, Any], ref: ClaimRef, *, driver: str, pool: str, default_policy: AllocationPolicy
) -> ClaimRequest:
    metadata = _mapping(obj.get("metadata"), "metadata")
    uid = metadata.get("uid")
    if uid != ref.uid:
        raise ClaimError(
            f"claim {ref}: metadata.uid is {uid!r} but the kubelet asked for {ref.uid!r} "
            "(the claim was deleted and recreated)"
        )
    status = _mapping(obj.get("status") or {}, "status")
    allocation = status.get("allocation")
    if not allocation:
        raise ClaimError(f"claim {ref}: status.allocation is empty: the claim is not allocated")
    devices = _mapping(_mapping(allocation, "status.allocation").get("devices") or {}, "status.allocation.devices")
    configs = _configs(devices.get("config") or [], driver, CPUConfig(default_policy), ref)
    results = []
    for index, raw in enumerate(_list(devices.get("results") or [], "status.allocation.devices.results")):
        path = f"status.allocation.devices.results[{index}]"
        result = _mapping(raw, path)
        if result.get("driver") != driver:
            continue
        if result.get("pool") != pool:
            raise ClaimError(
                f"claim {ref}: {path}.pool is {result.get('pool')!r} but this node serves pool {pool!r}: "
                "the claim was allocated to another node"
            )
        request = _string(result.get("request"), f"{path}.request")
        consumed = _mapping(result.get("consumedCapacity") or {}, f"{path}.consumedCapacity")
        config = configs.get(request, configs.get(request.split("/", 1)[0], configs.get("", CPUConfig(default_policy))))
        results.append(
            DeviceResult(
                request=request,
                device=_string(result.get("device"), f"{path}.device"),
                pool=pool,
                share_id=result.get("shareID"),
                consumed=tuple(sorted((str(k), str(v)) for k, v in consumed.items())),
                policy=config.policy,
                memory_binding=config.memory_binding,
            )
        )
    if not results:
        raise ClaimError(f"claim {ref}: no allocation result is for driver {driver!r}")
    pods = tuple(
        PodRef(str(r.get("name") or ""), str(r.get("uid")))
        for r in _list(status.get("reservedFor") or [], "status.reservedFor")
        if isinstance(r, Mapping) and r.get("resource") == "pods" and r.get("uid")
    )
    annotations = _at("metadata.annotations").mapping(metadata.get("annotations"))
    pod_claim = annotations.get(POD_CLAIM_NAME_ANNOTATION)
    return ClaimRequest(
        ref=ref,
        results=tuple(results),
        pods=pods,
        pod_claim_name=pod_claim if isinstance(pod_claim, str) and pod_claim else None,
    )


def _configs(configs: Any, driver: str, default: CPUConfig, ref: ClaimRef) -> dict[str, CPUConfig]:
    """Request name ("" = every request) -> config. Class config comes first and the claim's own overrides it."""
    entries = _list(configs, "status.allocation.devices.config")
    ordered = sorted(enumerate(entries), key=lambda e: 0 if _source(e[1]) == "FromClass" else 1)
    policies: dict[str, CPUConfig] = {}
    for index, raw in ordered:
        path = f"status.allocation.devices.config[{index}]"
        entry = _mapping(raw, path)
        opaque = _mapping(entry.get("opaque") or {}, f"{path}.opaque")
        if opaque.get("driver") != driver:
            continue
        params = _mapping(opaque.get("parameters") or {}, f"{path}.opaque.parameters")
        requests = [str(r) for r in _list(entry.get("requests") or [], f"{path}.requests")] or [""]
        for request in requests:
            base = policies.get(request, policies.get("", default))
            policies[request] = parse_cpu_config(params, f"{path}.opaque.parameters", base, ref)
    return policies


def _source(entry: Any) -> Any:
    return entry.get("source") if isinstance(entry, Mapping) else None


def parse_cpu_config(params: Mapping[str, Any], path: str, base: CPUConfig, ref: ClaimRef) -> CPUConfig:
    if params.get("apiVersion") != CONFIG_API_VERSION or params.get("kind") != CONFIG_KIND:
        raise ClaimError(
            f"claim {ref}: {path} has apiVersion {params.get('apiVersion')!r} and kind {params.get('kind')!r}; "
            f"expected apiVersion {CONFIG_API_VERSION!r} and kind {CONFIG_KIND!r}"
        )
    values: dict[str, bool] = {}
    binding = base.memory_binding
    for key, value in params.items():
        if key in ("apiVersion", "kind"):
            continue
        if key == MEMORY_BINDING_FIELD:
            binding = _memory_binding(value, f"{path}.{key}", ref)
            continue
        if key not in _CONFIG_FIELDS:
            known = ", ".join(sorted([*_CONFIG_FIELDS, MEMORY_BINDING_FIELD]))
            raise ClaimError(f"claim {ref}: {path}.{key} is not a known field (known: {known})")
        if not isinstance(value, bool):
            raise ClaimError(f"claim {ref}: {path}.{key} must be true or false, not {value!r}")
        values[_CONFIG_FIELDS[key]] = value
    policy = replace(base.policy, **values)
    if policy.spread and policy.align_l3:
        raise ClaimError(f"claim {ref}: {path}: spread and alignL3 contradict each other")
    return CPUConfig(policy, binding)


def _memory_binding(value: Any, path: str, ref: ClaimRef) -> MemoryBinding:
    try:
        return MemoryBinding(value)
    except ValueError:
        choices = " or ".join(repr(b.value) for b in MemoryBinding)
        raise ClaimError(f"claim {ref}: {path} must be {choices}, not {shown(value)}") from None


def _at(path: str) -> At:
    return At("", path, ClaimError)


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    return _at(path).mapping(value, optional=False)


def _list(value: Any, path: str) -> list[Any]:
    return _at(path).list(value, optional=False)


def _string(value: Any, path: str) -> str:
    return _at(path).string(value)
