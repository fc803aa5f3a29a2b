"""Shared fixtures. Each real component of the test environment brings its own plugin module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.paths import SYSFS, SYSFS_FIXTURES

pytest_plugins: list[str] = [
    "tests.harness.runtimes.fixtures",
    "tests.support.control_plane",
    "tests.support.cluster",
    "tests.support.testenv_apiserver",
    "tests.support.kubelet_node",
    "tests.support.testenv_helm",
    "tests.support.guest_node",
    "tests.support.real_node",
    # After real_node, which it imports: a plugin imported before its own registration is not assertion-rewritten.
    "tests.support.guest_kubelet",
]


@pytest.fixture(params=SYSFS_FIXTURES)
def sysfs_fixture(request: pytest.FixtureRequest) -> Path:
    """Each real-kernel sysfs capture under tests/fixtures/sysfs."""
    return SYSFS / str(request.param)
