"""Pods as the API server returns them, for the limit checks at prepare (core/cpu_quota.py, core/memory_limit.py):
containers that use a claim and their limits of one resource, a pod-level limit, and the status the 1.37 scheduler
leaves for a claim with a node-allocatable-mapped device. The pod is ns/<name>; its claim entry is `entry`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pods:
    resource: str
    name: str
    claim: str
    entry: str

    def container(
        self, name: str = "app", limit: str | None = None, claims: tuple[str, ...] | None = None
    ) -> dict[str, Any]:
        """A container that uses the claim (or the pod's `claims` entries) with a limit of the resource."""
        names = (self.entry,) if claims is None else claims
        resources: dict[str, Any] = {"claims": [{"name": c} for c in names]}
        if limit is not None:
            resources["limits"] = {self.resource: limit}
        return {"name": name, "image": "busybox", "resources": resources}

    def pod(
        self,
        *containers: dict[str, Any],
        claim: dict[str, str] | None = None,
        pod_limit: str | None = None,
        status: dict[str, Any] | None = None,
        init: tuple[dict[str, Any], ...] = (),
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "resourceClaims": [{"name": self.entry, **(claim or {"resourceClaimName": self.claim})}],
            "containers": list(containers),
        }
        if init:
            spec["initContainers"] = list(init)
        if pod_limit is not None:
            spec["resources"] = {"limits": {self.resource: pod_limit}}
        return {"metadata": {"namespace": "ns", "name": self.name}, "spec": spec, "status": status or {}}

    def mapped(self, amount: str, *containers: str) -> dict[str, Any]:
        """pod.status for the claim with `amount` of the resource mapped to node allocatable, for `containers`."""
        mapping = [{"name": self.resource, "quantity": amount}]
        return {
            "nodeAllocatableResourceClaimStatuses": [
                {"resourceClaimName": self.claim, "containers": list(containers), "mapping": mapping}
            ]
        }
