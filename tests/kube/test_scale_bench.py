"""hack/bench/scale.py runs as its docstring says: `--quick` starts its own control plane, every pod of every case
(native, the five slice shapes with claim templates, DRA extended resources) is bound, and each case has its
figures. It checks the benchmark works, not how fast anything is."""

from __future__ import annotations

import pytest

from tests.harness.cluster.benchmarks import quick_report

CASES = ("native", "numanode", "nomemory", "socket", "machine", "individual", "extended")


@pytest.mark.apiserver
def test_quick_run_binds_every_pod_of_every_case() -> None:
    report = quick_report("hack/bench/scale.py", 900)
    assert (report["nodes"], report["pods"], report["latencyPods"]) == (3, 6, 2)
    assert report["version"].startswith("v1.")
    [plane] = report["planes"].values()
    assert plane["bound"] == dict.fromkeys(CASES, 6)
    for case in CASES:
        row = plane["figures"][case]
        for figure in ("pods_per_s", "bound_p50_ms", "writes_per_pod"):
            assert row[figure] > 0, (case, figure)
        # CPU times tick in 10 ms: 6 pods may take less.
        assert row["scheduler_cpu_ms"] >= 0 and row["plane_cpu_ms"] >= 0, case
        assert row["attempts_per_pod"] >= 1, case
        if case != "native":
            assert row["slice_bytes"] > 0, case
    # Every pod of the claim cases wrote more than a native pod: at least the claim and its allocation.
    native = plane["figures"]["native"]["writes_per_pod"]
    assert all(plane["figures"][case]["writes_per_pod"] >= native + 2 for case in CASES[1:])
    # The memory devices are the only difference between the two shapes.
    assert plane["figures"]["nomemory"]["slice_bytes"] < plane["figures"]["numanode"]["slice_bytes"]
    assert report["compatibility"]["numanode"]["both"] > report["compatibility"]["numanode"]["numaNodeId"] > 0
