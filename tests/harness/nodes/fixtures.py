"""pytest plugin: the nodes of tests/harness/nodes as fixtures.

node_factory   starts kubelet stand-in nodes on sysfs fixtures (tests/harness/nodes/standin.py); stopped after the
               test
real_node      the real node joined to `control_plane`, for the tests of a module (so that the session's other tests
               never see a real node their unpinned pods could land on); marked `kubelet`
dra_cpu_image  the driver's image built from this checkout, once per run
dra_cpu_node   dra-cpu installed on the real node with helm, for the tests of a module; marked `kubelet`
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.cluster.chart import ChartError, DriverImage, InstalledDriver
from tests.harness.cluster.control_plane import ControlPlane
from tests.harness.cluster.helm import Helm
from tests.harness.fixtures import mark_users, started
from tests.harness.guest.vm import Guest, GuestError
from tests.harness.nodes.guest_kubelet import GuestKubeletNode
from tests.harness.nodes.guest_standin import VERSIONS, GuestStandinNode, containerd_versions
from tests.harness.nodes.kubelet import NodeError
from tests.harness.nodes.real import RealNode
from tests.harness.nodes.standin import NodeFactory, StandinNodes
from tests.harness.poll import WaitTimeout


@pytest.fixture
def node_factory() -> Iterator[NodeFactory]:
    nodes = StandinNodes()
    try:
        yield nodes.start
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def real_node(request: pytest.FixtureRequest, control_plane: ControlPlane) -> Iterator[RealNode]:
    with started(RealNode(control_plane), "the real node", (NodeError,)) as node:
        yield node
        if request.session.testsfailed:
            print(f"kubelet log kept in {node.keep_logs()}")


@pytest.fixture(scope="session")
def dra_cpu_image() -> Iterator[DriverImage]:
    with started(DriverImage(), "the driver's image", (ChartError,)) as image:
        yield image


@pytest.fixture(scope="module")
def dra_cpu_node(real_node: RealNode, helm: Helm, dra_cpu_image: DriverImage) -> Iterator[InstalledDriver[RealNode]]:
    driver = InstalledDriver(real_node, helm, dra_cpu_image.archive)
    with started(driver, "dra-cpu on the real node", (ChartError, WaitTimeout)) as installed:
        yield installed


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def _guest_node_module(request: pytest.FixtureRequest, guest: Guest) -> Iterator[GuestStandinNode]:
    version = str(request.param)
    if version not in containerd_versions(guest):
        pytest.skip(f"containerd {version} is not in the guest: rebuild it with hack/testenv/guest.sh install")
    with GuestStandinNode(guest, version, f"/var/lib/dra-guest/node-{version}") as node:
        yield node


@pytest.fixture
def guest_node(_guest_node_module: GuestStandinNode) -> Iterator[GuestStandinNode]:
    yield _guest_node_module
    _guest_node_module.clean()


only_newest_containerd = pytest.mark.parametrize(
    "_guest_node_module", VERSIONS[:1], indirect=True, ids=[f"containerd-{v}" for v in VERSIONS[:1]]
)
"""For tests about the driver rather than the runtime: containerd 2.1 only, which production nodes run."""


@pytest.fixture(scope="module")
def guest_kubelet(
    request: pytest.FixtureRequest, control_plane: ControlPlane, helm: Helm
) -> Iterator[GuestKubeletNode]:
    with started(GuestKubeletNode(control_plane, helm), "the guest's node", (NodeError, GuestError)) as node:
        request.config.stash[_JOINED] = node
        yield node
        if request.session.testsfailed:
            print(f"guest node logs kept in {node.keep_logs()}")


_JOINED = pytest.StashKey[GuestKubeletNode]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_users(items, {"real_node", "dra_cpu_node"}, pytest.mark.kubelet)
    mark_users(items, {"guest_kubelet"}, pytest.mark.guest)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    node = config.stash.get(_JOINED, None)
    if node is None:
        return
    terminalreporter.write_sep("-", "guest node")
    terminalreporter.write_line(", ".join(f"{what} in {seconds:.0f} s" for what, seconds in node.timings.items()))
