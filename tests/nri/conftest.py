"""A dra-cpu node (driver and NRI plugin) on each containerd of tests/support/testenv_containerd.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.runtimes.containerd import Containerd
from tests.support.nri_node import Node, nri_node


@pytest.fixture
def node(containerd: Containerd, tmp_path: Path) -> Iterator[Node]:
    yield from nri_node(containerd, tmp_path)


@pytest.fixture
def fresh_node(fresh_containerd: Containerd, tmp_path: Path) -> Iterator[Node]:
    """On a daemon of the test's own, for tests that restart or kill it."""
    yield from nri_node(fresh_containerd, tmp_path)
