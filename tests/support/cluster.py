"""Plain-JSON access to the test control plane, and what DRA tests set up on it: Nodes with our ResourceSlices, the
chart's objects, pods pinned to a node, and polling until the scheduler or a controller has acted.

Objects are dicts with the server's own field names (as `kubectl get -o json` shows them), never typed models, so that
a test compares what it sent with what it reads back field by field.

Fixture (this module is a pytest plugin):
  admin   a Kube with the control plane's admin credentials, closed after the test.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client

from dra_cpu.core.devices import DeviceConfig, build_devices
from dra_cpu.core.topology import Topology
from dra_cpu.kube.apiserver import connect
from dra_cpu.kube.publisher import SlicePublisher
from dra_cpu.node.sysfs import read_topology
from tests.harness.poll import wait_until
from tests.support.control_plane import ControlPlane, close, create_namespace, create_node

LOG = logging.getLogger("test.cluster")
MERGE_PATCH = "application/merge-patch+json"
DRIVER = "dra.cpu"
CPU_CAPACITY = f"{DRIVER}/cpu"
T = TypeVar("T")

# Kinds a test writes that are not namespaced.
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "Node",
        "ClusterRole",
        "ClusterRoleBinding",
        "DeviceClass",
        "ResourceSlice",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
)


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


def plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    return lower + ("es" if lower.endswith("s") else "s")


def collection_path(api_version: str, kind: str, namespace: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if kind in CLUSTER_SCOPED:
        return f"{base}/{plural(kind)}"
    if not namespace:
        raise ValueError(f"a {kind} needs a namespace")
    return f"{base}/namespaces/{namespace}/{plural(kind)}"


def object_path(obj: Mapping[str, Any], namespace: str | None = None) -> str:
    meta = obj["metadata"]
    path = collection_path(obj["apiVersion"], obj["kind"], meta.get("namespace") or namespace)
    return f"{path}/{meta['name']}"


@dataclass(frozen=True)
class Kube:
    """Requests by path with JSON bodies, through the typed client's ApiClient (so its credentials, TLS settings and
    bearer tokens apply)."""

    api: client.ApiClient

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Iterable[tuple[str, str]] = (),
        content_type: str = "application/json",
    ) -> Any:
        """The decoded JSON answer; raises client.ApiException (with .status and .body) for a 4xx/5xx."""
        serialized = self.api.param_serialize(
            method,
            path,
            query_params=list(query),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*serialized)
        data = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            raise client.ApiException(http_resp=response)
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def find(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when there is none (404)."""
        try:
            found: dict[str, Any] = self.get(path)
            return found
        except client.ApiException as err:
            if err.status == 404:
                return None
            raise

    def list(self, path: str, field_selector: str = "", label_selector: str = "") -> list[dict[str, Any]]:
        query = [(k, v) for k, v in (("fieldSelector", field_selector), ("labelSelector", label_selector)) if v]
        listed = self.request("GET", path, query=query)
        # Items of a list carry no apiVersion and kind; give them those of the list, as kubectl does.
        kind = {"apiVersion": listed["apiVersion"], "kind": str(listed["kind"]).removesuffix("List")}
        return [{**kind, **item} for item in listed["items"]]

    def create(self, obj: Mapping[str, Any], namespace: str | None = None, strict: bool = True) -> dict[str, Any]:
        path = collection_path(obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace") or namespace)
        query = [("fieldValidation", "Strict")] if strict else []
        created: dict[str, Any] = self.request("POST", path, dict(obj), query=query)
        return created

    def patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        patched: dict[str, Any] = self.request("PATCH", path, dict(patch), content_type=MERGE_PATCH)
        return patched

    def delete(self, path: str, force: bool = False) -> None:
        """Deletes, tolerating 404. `force`: grace period 0, as no kubelet is there to confirm a pod's end."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0} if force else None
        try:
            self.request("DELETE", path, body)
        except client.ApiException as err:
            if err.status != 404:
                raise


# ----------------------------------------------------------------------------------------------------------------
# A node with our slices.


@dataclass(frozen=True)
class TestNode:
    __test__ = False  # not a test class, despite the name

    name: str
    topology: Topology
    config: DeviceConfig
    slices: tuple[dict[str, Any], ...]  # as read back from the server after publishing


def node_resources(topology: Topology) -> tuple[int, int, dict[str, int]]:
    """(CPUs, memory bytes, hugepages bytes by page size) a kubelet on this topology would report."""
    hugepages: dict[str, int] = {}
    for node in topology.numa_nodes:
        for pool in node.hugepages:
            if pool.total:
                hugepages[pool.quantity] = hugepages.get(pool.quantity, 0) + pool.total * pool.size_kib * 1024
    return len(topology.online_cpus), sum(n.memory_bytes for n in topology.numa_nodes), hugepages


def publish_node(
    kubeconfig: Path, api: client.ApiClient, name: str, sysfs_root: Path, config: DeviceConfig | None = None
) -> TestNode:
    """A Ready Node sized like the machine at `sysfs_root`, and the driver's ResourceSlices for it, published the way
    the daemon publishes them (SlicePublisher, connected with `kubeconfig`)."""
    config = config or DeviceConfig(node_name=name)
    topology = read_topology(sysfs_root, pcie_roots=config.pcie_roots)
    cpus, memory, hugepages = node_resources(topology)
    create_node(api, name, cpus=cpus, memory=memory, hugepages=hugepages)
    kube = connect(str(kubeconfig))
    try:
        publisher = SlicePublisher(kube, config, LOG)
        publisher.set_devices(build_devices(topology, config))
        publisher.sync_once()
        if publisher.errors or publisher.dropped_field_warnings:
            raise AssertionError(f"publishing the slices of {name}: {publisher.errors} errors, fields dropped")
    finally:
        close(kube.api_client)
    slices = Kube(api).list(
        "/apis/resource.k8s.io/v1/resourceslices",
        field_selector=f"spec.nodeName={name},spec.driver={config.driver_name}",
    )
    return TestNode(name, topology, config, tuple(sorted(slices, key=lambda s: str(s["metadata"]["name"]))))


@pytest.fixture
def admin(control_plane: ControlPlane) -> Iterator[Kube]:
    api = control_plane.admin()
    try:
        yield Kube(api)
    finally:
        close(api)


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


def scheduled(kube: Kube, namespace: str, pod: str, timeout: float = 90.0) -> dict[str, Any]:
    """The pod once the scheduler bound it to a node; on timeout the failure shows its PodScheduled condition."""
    path = f"/api/v1/namespaces/{namespace}/pods/{pod}"

    def bound() -> dict[str, Any] | None:
        obj: dict[str, Any] = kube.get(path)
        return obj if obj["spec"].get("nodeName") else None

    try:
        return wait_until(bound, f"pod {namespace}/{pod} to be scheduled", timeout)
    except AssertionError as err:
        raise AssertionError(f"{err}; PodScheduled: {pod_scheduled_condition(kube.get(path))}") from None


def pod_scheduled_condition(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for condition in pod.get("status", {}).get("conditions", []):
        if condition["type"] == "PodScheduled":
            found: dict[str, Any] = condition
            return found
    return None


def claim_path(namespace: str, name: str) -> str:
    return f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}"


def allocated_claim(kube: Kube, namespace: str, name: str, timeout: float = 60.0) -> dict[str, Any]:
    def allocated() -> dict[str, Any] | None:
        claim: dict[str, Any] = kube.get(claim_path(namespace, name))
        return claim if claim.get("status", {}).get("allocation") else None

    return wait_until(allocated, f"claim {namespace}/{name} to be allocated", timeout)


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
