"""Fixtures for a real Kubernetes API server: kube-apiserver (and etcd) alone, from hack/testenv/kubernetes.sh
(tests/support/control_plane.py starts it).

    def test_x(kube_api: kubernetes.client.ApiClient) -> None:
        kubernetes.client.ResourceV1Api(kube_api).create_resource_slice(...)

One server serves the whole test run, so tests share it: name cluster-scoped objects (ResourceSlice, DeviceClass, Node)
uniquely, and put namespaced objects in the namespace of the `kube_namespace` fixture. No scheduler or controller
runs against it: a test writes a claim's status as the scheduler would, and nothing acts on it behind the test's back
(no garbage collection, no clean-up of reservedFor). Tests of what the scheduler and controllers do use the
`control_plane` fixture, a separate, whole control plane.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kubernetes
import pytest

from dra_cpu.kube.apiserver import KubeAPI, connect
from tests.harness.typed import as_dict
from tests.support.control_plane import APISERVER_ONLY, ApiServer, close, create_namespace, new_client, started

__all__ = ["ApiServer", "ServerClaims", "apiserver", "kube", "kube_api", "kube_namespace"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # So that `-m "not apiserver"` leaves out every test that needs the server, however it gets there.
    for item in items:
        if {"apiserver", "control_plane"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.apiserver)


@pytest.fixture(scope="session")
def apiserver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A running kube-apiserver, for the whole test run."""
    with started(request, tmp_path_factory, APISERVER_ONLY, name="apiserver") as plane:
        yield plane.apiserver


@pytest.fixture
def kube_api(apiserver: ApiServer) -> Iterator[kubernetes.client.ApiClient]:
    """A typed-client ApiClient authenticated as cluster admin to the test API server."""
    api = new_client(apiserver.kubeconfig)
    try:
        yield api
    finally:
        close(api)


@pytest.fixture
def kube(apiserver: ApiServer) -> Iterator[KubeAPI]:
    """The driver's own client (dra_cpu.kube.apiserver.KubeAPI), connected to the test API server as cluster admin."""
    api = connect(str(apiserver.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def kube_namespace(kube_api: kubernetes.client.ApiClient) -> str:
    """A namespace no other test uses, created on the server (left behind: the server lives for the run only)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    create_namespace(kube_api, name)
    return name


@dataclass(frozen=True)
class ServerClaims:
    """Where prepare tests put allocated claims on the server (a tests.support.kubelet_node ClaimStore): creates the
    claim, then writes its status the way the scheduler does, through the status subresource. kube-apiserver refuses
    results of requests the claim does not have: a claim written without requests gets one per request its
    allocation names."""

    api: kubernetes.client.CustomObjectsApi

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        body = {k: v for k, v in obj.items() if k != "status"}
        body["metadata"] = {"name": meta["name"], "namespace": meta["namespace"]}
        if not body["spec"]["devices"]["requests"]:
            body["spec"] = copy.deepcopy(body["spec"])
            body["spec"]["devices"]["requests"] = [
                {"name": name, "exactly": {"deviceClassName": "dra.cpu"}} for name in _requests_named(obj["status"])
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
