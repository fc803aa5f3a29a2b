"""Claims as the scheduler leaves them, for tests that play the scheduler: allocation results for the devices of a
node, the driver's opaque CPUConfig, and where an allocated claim is put for the driver to read (a standalone folder,
or the API server through the status subresource)."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import kubernetes
import yaml

from dra_cpu.core.claims import allocation_result
from tests.harness.typed import as_dict

NODE = "node-a"
"""The node (and the pool of its devices) that the stand-in node and the daemon process run as."""
DRIVER = "dra.cpu"


def result(
    device: str,
    request: str = "cpus",
    cpus: int | str | None = None,
    memory: str | None = None,
    *,
    pool: str = NODE,
    **extra: Any,
) -> dict[str, Any]:
    """An allocation result for one of the devices of the node `pool` (this one's unless given). `cpus` (a count,
    or any quantity string, valid or not) and `memory` become its consumedCapacity."""
    consumed = {}
    if cpus is not None:
        consumed[f"{DRIVER}/cpu"] = str(cpus)
    if memory is not None:
        consumed[f"{DRIVER}/memory"] = memory
    return (
        allocation_result(DRIVER, pool, device, request=request, consumed=consumed, share_id=str(uuid.uuid4())) | extra
    )


def cpu_config(requests: list[str] | None = None, source: str = "FromClaim", **params: Any) -> dict[str, Any]:
    return {
        "source": source,
        "requests": requests or [],
        "opaque": {"driver": DRIVER, "parameters": {"apiVersion": "dra.cpu/v1alpha1", "kind": "CPUConfig", **params}},
    }


class ClaimStore(Protocol):
    """Where tests put allocated claims: a standalone folder, or the API server (through the status subresource)."""

    def put(self, obj: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class FolderClaims:
    root: Path

    def put(self, obj: dict[str, Any]) -> None:
        path = self.root / obj["metadata"]["namespace"] / f"{obj['metadata']['name']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(obj))


@dataclass(frozen=True)
class ServerClaims:
    """Allocated claims on the API server: creates the claim, then writes its status the way the scheduler does,
    through the status subresource. kube-apiserver refuses results of requests the claim does not have: a claim
    written without requests gets one per request its allocation names."""

    api: kubernetes.client.CustomObjectsApi

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        body = {k: v for k, v in obj.items() if k != "status"}
        body["metadata"] = {"name": meta["name"], "namespace": meta["namespace"]}
        if not body["spec"]["devices"]["requests"]:
            body["spec"] = copy.deepcopy(body["spec"])
            body["spec"]["devices"]["requests"] = [
                {"name": name, "exactly": {"deviceClassName": DRIVER}} for name in _requests_named(obj["status"])
            ]
        created = as_dict(
            self.api.create_namespaced_custom_object("resource.k8s.io", "v1", meta["namespace"], "resourceclaims", body)
        )
        created["status"] = copy.deepcopy(obj["status"])
        self.api.replace_namespaced_custom_object_status(
            "resource.k8s.io", "v1", meta["namespace"], "resourceclaims", meta["name"], created
        )
        meta["uid"] = created["metadata"]["uid"]


def _requests_named(status: dict[str, Any]) -> list[str]:
    devices = (status.get("allocation") or {}).get("devices") or {}
    names = [r["request"] for r in devices.get("results", [])]
    names += [n for c in devices.get("config", []) for n in c.get("requests", [])]
    return list(dict.fromkeys(n.split("/")[0] for n in names))
