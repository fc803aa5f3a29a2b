"""Shared fixtures. Each real component of the test environment brings its own plugin module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.paths import SYSFS, SYSFS_FIXTURES

pytest_plugins: list[str] = [
    "tests.support.testenv_containerd",
    "tests.support.testenv_podman",
    "tests.support.control_plane",
    "tests.support.testenv_apiserver",
    "tests.support.kubelet_node",
    "tests.support.testenv_helm",
    "tests.support.real_node",
]


@pytest.fixture(params=SYSFS_FIXTURES)
def sysfs_fixture(request: pytest.FixtureRequest) -> Path:
    """Each real-kernel sysfs capture under tests/fixtures/sysfs."""
    return SYSFS / str(request.param)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The cgroup v2 tests move the cpuset and cpu controllers, which the kernel releases only once no cgroup of
    # theirs is left, dying ones included: containers that exited minutes earlier (the podman tests) still hold them.
    items.sort(key=lambda item: item.path.name != "test_cgroupv2.py")
