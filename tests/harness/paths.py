"""Where the repository's test inputs are, for tests, fixtures and the benchmarks in hack/bench."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
SYSFS = FIXTURES / "sysfs"
EXAMPLES = REPO / "hack" / "examples"
TESTENV = REPO / "hack" / "testenv"
TESTENV_CACHE = Path("/var/cache/dra-cpu-testenv")
"""Where hack/testenv's scripts install the real components (Kubernetes, containerd, podman, helm, the guest)."""
SYSFS_FIXTURES = sorted(p.name for p in SYSFS.iterdir() if p.is_dir())
"""The name of each real-kernel sysfs capture under tests/fixtures/sysfs."""
