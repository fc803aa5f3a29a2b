"""Shared fixtures. Each real component of the test environment brings its own plugin module."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SYSFS_FIXTURES = sorted(p.name for p in (FIXTURES / "sysfs").iterdir() if p.is_dir())

pytest_plugins: list[str] = [
    "testenv_containerd",
    "testenv_podman",
    "testenv_apiserver",
    "kubelet_node",
    "testenv_helm",
    "tests.support.guest_node",
]


@pytest.fixture(params=SYSFS_FIXTURES)
def sysfs_fixture(request: pytest.FixtureRequest) -> Path:
    """Each real-kernel sysfs capture under tests/fixtures/sysfs."""
    return FIXTURES / "sysfs" / str(request.param)
