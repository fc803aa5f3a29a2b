"""Fixtures the real-node tests share (test_node_claims.py, test_node_restarts.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology
from tests.harness.cluster.chart import InstalledDriver
from tests.harness.cluster.objects import new_namespace
from tests.harness.cluster.pods import delete_pod
from tests.harness.driver_files import checkpoint_claims
from tests.harness.nodes.real import RealNode
from tests.harness.poll import wait_until


@pytest.fixture(scope="module")
def topology() -> Topology:
    """This machine's topology, which the real node has."""
    return read_topology(Path("/"))


@pytest.fixture
def namespace(dra_cpu_node: InstalledDriver[RealNode], request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace for the test's objects; its pods are deleted afterwards and their claims unprepared."""
    kube = dra_cpu_node.node.kube
    name = new_namespace(kube, request.module.__name__.rsplit("_", 1)[-1])
    yield name
    for pod in kube.list(f"/api/v1/namespaces/{name}/pods"):
        delete_pod(kube, name, pod["metadata"]["name"])
    wait_until(lambda: not checkpoint_claims(dra_cpu_node.state_dir), "every claim to be unprepared", 60)
    kube.delete(f"/api/v1/namespaces/{name}")
