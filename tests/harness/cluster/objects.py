"""Objects on the API server as the tests and benchmarks make them: Nodes as a kubelet registers them (for a
cluster without kubelets), namespaces, ResourceSlices written directly, the chart's access objects, and claims and
pods as users write them.

Objects are dicts with the server's own field names (as `kubectl get -o json` shows them), never typed models, so that
a test compares what it sent with what it reads back field by field."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes import client

from tests.harness.cluster.client import MERGE_PATCH, Kube, unparsed
from tests.harness.poll import wait_until

DRIVER = "dra.cpu"
CPU_CAPACITY = f"{DRIVER}/cpu"
DRIVER_ACCESS_KINDS = frozenset(
    {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
)
"""The chart's objects that give the driver its access to the API server, and bound it: what a test applies from
`helm template` when the driver does not run as the chart's DaemonSet."""


def create_node(
    api: client.ApiClient,
    name: str,
    cpus: int,
    memory: int,
    hugepages: Mapping[str, int] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Creates a Node as a kubelet registers it, Ready, and returns it as stored: capacity and allocatable of `cpus`
    CPUs, `memory` bytes and `hugepages` (page size such as "2Mi" -> bytes), which a kubelet takes out of the
    allocatable memory. Nothing marks it NotReady later: the control plane runs no node lifecycle controller."""
    huge = {f"hugepages-{size}": str(amount) for size, amount in (hugepages or {}).items()}
    common = {"cpu": str(cpus), "pods": "110", "ephemeral-storage": str(100 << 30), **huge}
    capacity = {**common, "memory": str(memory)}
    allocatable = {**common, "memory": str(memory - sum((hugepages or {}).values()))}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **(labels or {}),
            },
        },
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "made by the test",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
            ],
        },
    }
    core = client.CoreV1Api(api)
    node = client.V1Node.from_dict({k: v for k, v in obj.items() if k != "status"})
    assert node is not None
    core.create_node(node)
    # Status goes through its subresource, as the kubelet writes it.
    response = core.patch_node_status(
        name, {"status": obj["status"]}, _content_type=MERGE_PATCH, _preload_content=False
    )
    stored: dict[str, Any] = json.loads(unparsed(response).data)
    # The TaintNodesByCondition admission plugin gives a new Node the not-ready taint; the node lifecycle controller
    # would take it off once the Node is Ready. It does not run here, so do its part.
    taints = stored["spec"].get("taints", [])
    kept = [t for t in taints if t["key"] != "node.kubernetes.io/not-ready"]
    if kept != taints:
        response = core.patch_node(
            name, {"spec": {"taints": kept or None}}, _content_type=MERGE_PATCH, _preload_content=False
        )
        stored = json.loads(unparsed(response).data)
    return stored


def delete_node(api: client.ApiClient, name: str) -> None:
    with contextlib.suppress(client.ApiException):
        client.CoreV1Api(api).delete_node(name, _preload_content=False)


def create_namespace(api: client.ApiClient, name: str) -> None:
    namespace = client.V1Namespace.from_dict({"metadata": {"name": name}})
    assert namespace is not None
    client.CoreV1Api(api).create_namespace(namespace)


def resource_slice(
    name: str,
    node: str,
    driver: str,
    devices: Sequence[Mapping[str, Any]],
    pool: str | None = None,
    generation: int = 1,
) -> dict[str, Any]:
    """A ResourceSlice as a test writes it directly: the only slice of pool `pool` (the node's name unless given)."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": pool or node, "generation": generation, "resourceSliceCount": 1},
            "devices": [dict(d) for d in devices],
        },
    }


def new_namespace(kube: Kube, prefix: str = "test") -> str:
    """A new namespace, once the serviceaccount controller gave it the `default` ServiceAccount pods need."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    create_namespace(kube.api, name)
    wait_until(
        lambda: kube.find(f"/api/v1/namespaces/{name}/serviceaccounts/default"), f"the ServiceAccount {name}/default"
    )
    return name


def ensure(kube: Kube, objs: Sequence[Mapping[str, Any]], namespace: str | None = None) -> None:
    """Creates each object unless one of that name exists."""
    for obj in objs:
        try:
            kube.create(obj, namespace)
        except client.ApiException as err:
            if err.status != 409:
                raise


def pinned_pod(pod: Mapping[str, Any], node: str) -> dict[str, Any]:
    """A copy of `pod` the scheduler may place only on `node` (a nodeSelector on the hostname label)."""
    copy: dict[str, Any] = json.loads(json.dumps(pod))
    copy["spec"]["nodeSelector"] = {**copy["spec"].get("nodeSelector", {}), "kubernetes.io/hostname": node}
    return copy


def claim_path(namespace: str, name: str) -> str:
    return f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}"


def defaulted_from(stored: Any, sent: Any) -> bool:
    """Whether `stored` is `sent` plus what the API server fills in by default (fields `sent` lacks, such as a device
    request's allocationMode and count): every field sent is stored unchanged, lists keep their length and order."""
    if isinstance(sent, Mapping):
        return isinstance(stored, Mapping) and all(
            k in stored and defaulted_from(stored[k], v) for k, v in sent.items()
        )
    if isinstance(sent, list):
        return isinstance(stored, list) and len(stored) == len(sent) and all(map(defaulted_from, stored, sent))
    return bool(stored == sent)


# ----------------------------------------------------------------------------------------------------------------
# Objects as users write them.


def cpu_claim(name: str, cpus: int | str = 1, selector: str = "", template: bool = False) -> dict[str, Any]:
    """A claim as upstream dra-driver-cpu users write it: class dra.cpu, capacity dra.cpu/cpu, optional CEL."""
    request: dict[str, Any] = {"deviceClassName": DRIVER, "capacity": {"requests": {CPU_CAPACITY: str(cpus)}}}
    if selector:
        request["selectors"] = [{"cel": {"expression": selector}}]
    spec = {"devices": {"requests": [{"name": "cpus", "exactly": request}]}}
    if template:
        return {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": {"name": name},
            "spec": {"spec": spec},
        }
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": name}, "spec": spec}


def busybox_pod(name: str, claims: Mapping[str, str] | None = None, template: bool = False) -> dict[str, Any]:
    """A pod of the test busybox image (its command sleeps, and ends at once on SIGTERM) with `claims` (pod claim
    name -> ResourceClaim name, or ResourceClaimTemplate name when `template`) for its one container."""
    key = "resourceClaimTemplateName" if template else "resourceClaimName"
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 1,
        "containers": [
            {
                "name": "app",
                "image": "localhost/busybox:latest",
                "imagePullPolicy": "Never",
                "resources": {"claims": [{"name": c} for c in claims or {}]},
            }
        ],
    }
    if claims:
        spec["resourceClaims"] = [{"name": c, key: target} for c, target in claims.items()]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def deployment(name: str, pod: Mapping[str, Any], replicas: int = 1) -> dict[str, Any]:
    """A Deployment of `replicas` copies of `pod` (its spec; labelled app=<name>)."""
    labels = {"app": name}
    template = {"metadata": {"labels": labels}, "spec": json.loads(json.dumps(pod["spec"]))}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": template},
    }


def job(name: str, pod: Mapping[str, Any]) -> dict[str, Any]:
    """A Job that runs `pod` (its spec) once, never restarted (labelled app=<name>)."""
    spec = {**json.loads(json.dumps(pod["spec"])), "restartPolicy": "Never"}
    template = {"metadata": {"labels": {"app": name}}, "spec": spec}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {"template": template}}
