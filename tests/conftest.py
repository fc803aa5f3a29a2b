"""Shared fixtures. The harness (tests/harness) brings a plugin of fixtures for each of its parts."""

from __future__ import annotations

from pathlib import Path

import pytest

# Before anything imports the harness: its asserts then say what they compared, as a test's own do.
pytest.register_assert_rewrite("tests.harness")

from tests.harness.paths import SYSFS, SYSFS_FIXTURES  # noqa: E402

pytest_plugins: list[str] = [
    "tests.harness.runtimes.fixtures",
    "tests.harness.cluster.fixtures",
    "tests.harness.guest.fixtures",
    "tests.harness.nodes.fixtures",
]


@pytest.fixture(params=SYSFS_FIXTURES)
def sysfs_fixture(request: pytest.FixtureRequest) -> Path:
    """Each real-kernel sysfs capture under tests/fixtures/sysfs."""
    return SYSFS / str(request.param)
