"""hack/bench/scheduler.py runs as its docstring says: `--quick` starts its own control plane, every pod of both
cases (with and without requestPolicy) is bound, and each case has figures from the client and from the scheduler's
/metrics. It checks the bench works, not how fast the scheduler is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness.cluster.control_plane import Binaries
from tests.harness.component import Unavailable
from tests.harness.paths import REPO


@pytest.mark.apiserver
def test_quick_run_binds_every_pod_and_measures_both_cases() -> None:
    try:
        Binaries.installed()
    except Unavailable as err:
        pytest.skip(str(err))
    done = subprocess.run(
        [sys.executable, "hack/bench/scheduler.py", "--quick", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert (report["nodes"], report["pods"], report["rounds"]) == (3, 6, 1)
    assert report["bound"] == {"with": 6, "without": 6}
    assert report["version"].startswith("v1.")
    for row in ("bound_p50_ms", "bound_p99_ms", "attempt_mean_ms", "algorithm_mean_ms", "filter_mean_ms"):
        for case in ("with", "without"):
            assert report["figures"][row][case] > 0, (row, case)
