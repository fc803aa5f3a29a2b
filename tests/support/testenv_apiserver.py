"""Fixtures for a real Kubernetes API server (etcd + k8s.io/apiextensions-apiserver, hack/testenv/apiserver.sh).

    def test_x(kube_api: kubernetes.client.ApiClient) -> None:
        kubernetes.client.ResourceV1Api(kube_api).create_resource_slice(...)

One server serves the whole test run, so tests share it: name cluster-scoped objects (ResourceSlice, DeviceClass)
uniquely, and put ResourceClaims in the namespace of the `kube_namespace` fixture. It serves resource.k8s.io/v1
ResourceSlice, ResourceClaim (with a status subresource) and DeviceClass from CRDs generated from the Kubernetes 1.34
schema, and differs from kube-apiserver in ways tests must allow for: no core types (Node, Pod, Namespace), no
/api or /apis discovery (the typed client works; kubectl and the dynamic client do not), strategic merge patch
answers 415 (use merge patch), DELETE answers a Status the typed client cannot parse (pass _preload_content=False),
fields unknown to 1.34 are pruned, and none of the built-in validation of resource.k8s.io objects runs.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from tests.support.kube import close_api_client, new_api_client
from tests.support.paths import TESTENV
from tests.support.typed import as_dict

SCRIPT = TESTENV / "apiserver.sh"


@dataclass(frozen=True)
class ApiServer:
    kubeconfig: Path  # admin (system:masters) client certificate, absolute paths
    url: str  # https://127.0.0.1:PORT
    state_dir: Path  # certificates, etcd data, etcd.log and apiserver.log


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # So that `-m "not apiserver"` leaves out every test that needs the server, however it gets there.
    for item in items:
        if "apiserver" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.apiserver)


@pytest.fixture(scope="session")
def apiserver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A running API server with the resource.k8s.io/v1 CRDs established, for the whole test run."""
    if subprocess.run(["bash", str(SCRIPT), "installed"], check=False).returncode != 0:
        pytest.skip("the test API server is not installed: run hack/testenv/apiserver.sh install")
    state_dir = tmp_path_factory.mktemp("apiserver")
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", str(state_dir)], capture_output=True, text=True, timeout=180, check=False
    )
    try:
        if started.returncode != 0:
            pytest.fail(f"hack/testenv/apiserver.sh start failed:\n{started.stderr}", pytrace=False)
        kubeconfig = Path(started.stdout.strip())
        url = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        yield ApiServer(kubeconfig=kubeconfig, url=url, state_dir=state_dir)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state_dir)], timeout=60, check=False)
        # Keep the logs of a run that failed; pytest's tmp dir retention removes them later.
        if request.session.testsfailed == 0:
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def kube_api(apiserver: ApiServer) -> Iterator[kubernetes.client.ApiClient]:
    """A typed-client ApiClient authenticated as cluster admin to the test API server."""
    client = new_api_client(apiserver.kubeconfig)
    try:
        yield client
    finally:
        close_api_client(client)


@pytest.fixture
def kube_namespace() -> str:
    """A namespace name no other test uses (the server has no Namespace objects: any name is usable as is)."""
    return f"test-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class ServerClaims:
    """Where prepare tests put allocated claims on the server (a tests.support.kubelet_node ClaimStore): creates the
    claim, then writes its status the way the scheduler does, through the status subresource."""

    api: kubernetes.client.CustomObjectsApi

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        body = {k: v for k, v in obj.items() if k != "status"}
        body["metadata"] = {"name": meta["name"], "namespace": meta["namespace"]}
        created = as_dict(
            self.api.create_namespaced_custom_object("resource.k8s.io", "v1", meta["namespace"], "resourceclaims", body)
        )
        created["status"] = copy.deepcopy(obj["status"])
        self.api.replace_namespaced_custom_object_status(
            "resource.k8s.io", "v1", meta["namespace"], "resourceclaims", meta["name"], created
        )
        meta["uid"] = created["metadata"]["uid"]
