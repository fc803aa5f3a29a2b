"""pytest plugin: the container runtimes of tests/harness/runtimes as fixtures.

  containerd        a daemon per version in VERSIONS, shared by the tests of a session; pods and CDI specs a test made
                    are removed after it
  fresh_containerd  a daemon of the test's own, for tests that restart it or need it without state (NRI plugins
                    registering first, ...); stopped after the test
  podman            rootful podman; the CDI specs a test wrote are removed after it

Tests that use them are marked `containerd` or `podman`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.fixtures import mark_users, started
from tests.harness.runtimes.containerd import VERSIONS, Containerd
from tests.harness.runtimes.podman import Podman

IDS = [f"containerd-{v}" for v in VERSIONS]


@pytest.fixture(scope="session", params=VERSIONS, ids=IDS)
def _containerd_session(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    with started(Containerd(str(request.param)), "containerd") as daemon:
        yield daemon


@pytest.fixture
def containerd(_containerd_session: Containerd) -> Iterator[Containerd]:
    yield _containerd_session
    _containerd_session.clean()


@pytest.fixture(params=VERSIONS, ids=IDS)
def fresh_containerd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    with started(Containerd(str(request.param)), "containerd") as daemon:
        yield daemon


@pytest.fixture
def podman() -> Iterator[Podman]:
    with started(Podman(), "podman") as session:
        yield session


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_users(items, {"containerd", "fresh_containerd"}, pytest.mark.containerd)
    mark_users(items, {"podman"}, pytest.mark.podman)
