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

import uuid
from collections.abc import Iterator

import kubernetes
import pytest

from tests.support.control_plane import APISERVER_ONLY, ApiServer, close, create_namespace, new_client, started

__all__ = ["ApiServer", "apiserver", "kube_api", "kube_namespace"]


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
def kube_namespace(kube_api: kubernetes.client.ApiClient) -> str:
    """A namespace no other test uses, created on the server (left behind: the server lives for the run only)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    create_namespace(kube_api, name)
    return name
