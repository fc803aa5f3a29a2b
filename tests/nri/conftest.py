"""A dra-cpu node (driver and NRI plugin) on each containerd of the harness (tests/harness/nodes/nri.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.fixtures import started
from tests.harness.nodes.nri import NriNode
from tests.harness.runtimes.containerd import Containerd


@pytest.fixture
def node(containerd: Containerd, tmp_path: Path) -> Iterator[NriNode]:
    with started(NriNode(containerd, tmp_path), "the NRI node") as node:
        yield node


@pytest.fixture
def fresh_node(fresh_containerd: Containerd, tmp_path: Path) -> Iterator[NriNode]:
    """On a daemon of the test's own, for tests that restart or kill it."""
    with started(NriNode(fresh_containerd, tmp_path), "the NRI node") as node:
        yield node
