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
from typing import Any, TypeVar

from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.objects import At
from dra_cpu.errors import DraCpuError, shown

T = TypeVar("T")
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
    """Every field this driver reads is read through the typed reader: a field of the wrong JSON type is a
    ClaimError naming the claim, the field and the value, never another exception (which would fail the kubelet's
    whole NodePrepareResources call instead of this claim)."""
    claim = At(f"claim {ref}", "", ClaimError)
    obj = claim.mapping(obj, optional=False)
    metadata = (claim / "metadata").mapping(obj.get("metadata"), optional=False)
    uid = metadata.get("uid")
    if uid != ref.uid:
        raise ClaimError(
            f"claim {ref}: metadata.uid is {shown(uid)} but the kubelet asked for {ref.uid!r} "
            "(the claim was deleted and recreated)"
        )
    status_at = claim / "status"
    status = status_at.mapping(obj.get("status"))
    allocation = status.get("allocation")
    if not allocation:
        raise ClaimError(f"claim {ref}: status.allocation is empty: the claim is not allocated")
    devices_at = status_at / "allocation" / "devices"
    devices = devices_at.mapping((status_at / "allocation").mapping(allocation).get("devices"))
    spec = (claim / "spec").mapping(obj.get("spec"))
    default = CPUConfig(default_policy)
    configs = _configs(devices_at / "config", devices.get("config"), spec, driver, default, ref)
    results = []
    for at, raw in (devices_at / "results").items(devices.get("results")):
        result = at.mapping(raw, optional=False)
        if result.get("driver") != driver:
            continue
        if result.get("pool") != pool:
            raise at.fail(
                f"pool is {shown(result.get('pool'))} but this node serves pool {pool!r}: the claim was allocated to "
                "another node"
            )
        request = (at / "request").string(result.get("request"))
        share_id = result.get("shareID")
        config = configs.get(request, configs.get(request.split("/", 1)[0], configs.get("", default)))
        results.append(
            DeviceResult(
                request=request,
                device=(at / "device").string(result.get("device")),
                pool=pool,
                share_id=None if share_id is None else (at / "shareID").string(share_id),
                consumed=_consumed(at, result.get("consumedCapacity")),
                policy=config.policy,
                memory_binding=config.memory_binding,
            )
        )
    if not results:
        raise ClaimError(f"claim {ref}: no allocation result is for driver {driver!r}")
    pods = []
    for at, raw in (status_at / "reservedFor").items(status.get("reservedFor")):
        entry = at.mapping(raw, optional=False)
        if entry.get("resource") == "pods" and entry.get("uid") is not None:
            name = entry.get("name")
            if name is not None and not isinstance(name, str):
                raise (at / "name").fail(f"must be a string, not {shown(name)}")
            pods.append(PodRef(name or "", (at / "uid").string(entry.get("uid"))))
    annotations = (claim / "metadata" / "annotations").mapping(metadata.get("annotations"))
    pod_claim = annotations.get(POD_CLAIM_NAME_ANNOTATION)
    return ClaimRequest(
        ref=ref,
        results=tuple(results),
        pods=tuple(pods),
        pod_claim_name=pod_claim if isinstance(pod_claim, str) and pod_claim else None,
    )


def _consumed(at: At, value: Any) -> tuple[tuple[str, str], ...]:
    """consumedCapacity as (key, quantity text); grant() reads the amounts it needs."""
    consumed = []
    for key, amount in (at / "consumedCapacity").mapping(value).items():
        if isinstance(amount, bool) or not isinstance(amount, str | int):
            raise At(at.source, f"{at.path}.consumedCapacity[{str(key)!r}]", at.error).fail(
                f"must be a quantity, not {shown(amount)}"
            )
        consumed.append((str(key), str(amount)))
    return tuple(sorted(consumed))


def _configs(
    at: At, configs: Any, spec: Mapping[str, Any], driver: str, default: CPUConfig, ref: ClaimRef
) -> dict[str, CPUConfig]:
    """Request name ("" = every request) -> config. Class config comes first and the claim's own overrides it."""
    entries = [(entry_at, entry_at.mapping(raw, optional=False)) for entry_at, raw in at.items(configs)]
    origins = _origins(entries, At(at.source, "spec.devices", at.error), spec)
    ordered = sorted(zip(entries, origins, strict=True), key=lambda e: 0 if e[0][1].get("source") == "FromClass" else 1)
    policies: dict[str, CPUConfig] = {}
    for (entry_at, entry), origin in ordered:
        # What the user wrote is named where they wrote it (a claim's spec, a DeviceClass), not where it was copied.
        opaque_at = At(entry_at.source, origin, entry_at.error) / "opaque"
        opaque = opaque_at.mapping(entry.get("opaque"))
        if opaque.get("driver") != driver:
            continue
        params = (opaque_at / "parameters").mapping(opaque.get("parameters"), optional=False)
        requests = [r_at.string(r) for r_at, r in (entry_at / "requests").items(entry.get("requests"))] or [""]
        for request in requests:
            base = policies.get(request, policies.get("", default))
            policies[request] = parse_cpu_config(params, (opaque_at / "parameters").path, base, ref)
    return policies


def _origins(entries: list[tuple[At, Mapping[str, Any]]], spec_at: At, spec: Mapping[str, Any]) -> list[str]:
    """Where the user wrote each allocation config entry, for error messages: the claim's own entries are copies of
    its spec.devices.config[j]; a class's are copies of its spec.config[k], added in order, once per class. An entry
    whose origin cannot be found keeps its place in status.allocation.devices.config."""
    devices = _field(spec, "devices", dict) or {}
    written = _field(devices, "config", list) or []
    classes = _request_classes(_field(devices, "requests", list) or [])
    seen: dict[str, int] = {}
    origins = []
    for entry_at, entry in entries:
        origin = entry_at.path
        requests = _field(entry, "requests", list) or []
        if entry.get("source") == "FromClaim":
            same = [j for j, c in enumerate(written) if _same_config(c, entry)]
            origin = (spec_at / "config" / same[0]).path if same else origin
        elif entry.get("source") == "FromClass" and requests and requests[0] in classes:
            name = classes[requests[0]]
            origin = f"DeviceClass {name} spec.config[{seen.get(name, 0)}]"
            seen[name] = seen.get(name, 0) + 1
        origins.append(origin)
    return origins


def _field(obj: Any, key: str, kind: type[T]) -> T | None:
    """obj[key] when obj is a mapping and the value a `kind`; None otherwise (a reader that never fails)."""
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if isinstance(value, kind) else None


def _same_config(written: Any, entry: Mapping[str, Any]) -> bool:
    return isinstance(written, Mapping) and (written.get("opaque"), written.get("requests") or []) == (
        entry.get("opaque"),
        entry.get("requests") or [],
    )


def _request_classes(requests: list[Any]) -> dict[str, str]:
    """Request name (`request` or `request/subrequest`) -> its DeviceClass, from spec.devices.requests."""
    classes: dict[str, str] = {}
    for request in requests:
        name = _field(request, "name", str)
        if name is None:
            continue
        exactly = _field(_field(request, "exactly", dict), "deviceClassName", str)
        if exactly is not None:
            classes[name] = exactly
        for sub in _field(request, "firstAvailable", list) or []:
            sub_name, sub_class = _field(sub, "name", str), _field(sub, "deviceClassName", str)
            if sub_name is not None and sub_class is not None:
                classes[f"{name}/{sub_name}"] = sub_class
    return classes


def parse_cpu_config(params: Mapping[str, Any], path: str, base: CPUConfig, ref: ClaimRef) -> CPUConfig:
    if params.get("apiVersion") != CONFIG_API_VERSION or params.get("kind") != CONFIG_KIND:
        raise ClaimError(
            f"claim {ref}: {path} has apiVersion {shown(params.get('apiVersion'))} and kind "
            f"{shown(params.get('kind'))}; "
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
            raise ClaimError(f"claim {ref}: {path}.{key} must be true or false, not {shown(value)}")
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
