"""Running a benchmark of hack/bench/ that starts its own control plane, as its docstring says, from a test."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.harness.cluster.control_plane import Binaries
from tests.harness.component import Unavailable
from tests.harness.paths import REPO


def quick_report(script: str, timeout: float) -> dict[str, Any]:
    """`script --quick --json` from the repository root: its JSON report. Skips the test when the control plane is
    not installed; fails with the tail of the benchmark's stderr when it exits non-zero."""
    try:
        Binaries.installed()
    except Unavailable as err:
        pytest.skip(str(err))
    done = subprocess.run(
        [sys.executable, script, "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report
