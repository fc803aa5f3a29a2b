"""pytest plugin: the control plane of tests/harness/cluster as fixtures.

  control_plane   etcd, kube-apiserver, kube-scheduler and kube-controller-manager for the whole test run
  apiserver       kube-apiserver (and etcd) alone, for the whole test run: the ApiServer
  kube_api        a typed-client ApiClient as cluster admin to `apiserver`
  kube            the driver's own client (dra_cpu.kube.apiserver.KubeAPI) to `apiserver`, as cluster admin
  kube_namespace  a namespace of `apiserver` no other test uses
  admin           a Kube (plain JSON by path) as cluster admin to `control_plane`
  helm            helm v4; skips when it is not installed

One `apiserver` serves the whole run, so tests share it: name cluster-scoped objects (ResourceSlice, DeviceClass, Node)
uniquely, and put namespaced objects in `kube_namespace`. No scheduler or controller runs against it: a test writes a
claim's status as the scheduler would, and nothing acts on it behind the test's back (no garbage collection, no
clean-up of reservedFor). Tests of what the scheduler and controllers do use `control_plane`, a separate, whole one.
`started_plane` starts further, independent planes (a kube-apiserver with other feature gates, ...).
Tests that use a plane are marked `apiserver`.

    def test_x(kube_api: kubernetes.client.ApiClient) -> None:
        kubernetes.client.ResourceV1Api(kube_api).create_resource_slice(...)
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence

import kubernetes
import pytest

from dra_cpu.kube.apiserver import KubeAPI, connect
from tests.harness.cluster.client import Kube, close_api_client, new_api_client
from tests.harness.cluster.control_plane import (
    ALL,
    APISERVER_ONLY,
    FEATURE_GATES,
    ApiServer,
    ControlPlane,
    ControlPlaneError,
)
from tests.harness.cluster.helm import Helm
from tests.harness.cluster.objects import create_namespace
from tests.harness.component import Unavailable
from tests.harness.fixtures import mark_users, started


@contextlib.contextmanager
def started_plane(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    components: Sequence[str] = ALL,
    feature_gates: Mapping[str, bool] = FEATURE_GATES,
    name: str = "control-plane",
) -> Iterator[ControlPlane]:
    """A ControlPlane of `components` for the body of the `with`, for fixtures: skips when Kubernetes is not
    installed, fails with the failing component's log tail, and keeps the logs when a test failed."""
    state_dir = tmp_path_factory.mktemp(name)
    with started(ControlPlane(state_dir, components, dict(feature_gates)), name, (ControlPlaneError,)) as plane:
        yield plane
    # Keep the logs of a run that failed; pytest's tmp dir retention removes them later.
    if request.session.testsfailed == 0:
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with started_plane(request, tmp_path_factory) as plane:
        yield plane


@pytest.fixture(scope="session")
def apiserver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with started_plane(request, tmp_path_factory, APISERVER_ONLY, name="apiserver") as plane:
        yield plane.apiserver


@pytest.fixture
def kube_api(apiserver: ApiServer) -> Iterator[kubernetes.client.ApiClient]:
    api = new_api_client(apiserver.kubeconfig)
    try:
        yield api
    finally:
        close_api_client(api)


@pytest.fixture
def kube(apiserver: ApiServer) -> Iterator[KubeAPI]:
    api = connect(str(apiserver.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def kube_namespace(kube_api: kubernetes.client.ApiClient) -> str:
    """Created on the server, and left behind: the server lives for the run only."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    create_namespace(kube_api, name)
    return name


@pytest.fixture
def admin(control_plane: ControlPlane) -> Iterator[Kube]:
    api = control_plane.admin()
    try:
        yield Kube(api)
    finally:
        close_api_client(api)


@pytest.fixture(scope="session")
def helm() -> Helm:
    try:
        return Helm.installed()
    except Unavailable as err:
        pytest.skip(str(err))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # So that `-m "not apiserver"` leaves out every test that needs a server, however it gets there.
    mark_users(items, {"apiserver", "control_plane"}, pytest.mark.apiserver)
