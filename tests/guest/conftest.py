"""What the tests of the guest as a node share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.cluster.objects import new_namespace
from tests.harness.cluster.pods import delete_pod
from tests.harness.nodes.guest_kubelet import GuestKubeletNode

DELETE_SECONDS = 240.0
"""A pod's end and its claims' unprepare, on the emulated guest of a loaded 2-core machine."""


@pytest.fixture
def namespace(guest_kubelet: GuestKubeletNode, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace for the test's objects on the guest's node; its pods are deleted afterwards."""
    kube = guest_kubelet.kube
    name = new_namespace(kube, request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-"))
    yield name
    for pod in kube.list(f"/api/v1/namespaces/{name}/pods"):
        delete_pod(kube, name, pod["metadata"]["name"], timeout=DELETE_SECONDS)
    kube.delete(f"/api/v1/namespaces/{name}")
