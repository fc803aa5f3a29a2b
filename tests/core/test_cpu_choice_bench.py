"""hack/bench/cpu_choice.py runs as its docstring says: --quick replays every trace, prints a row per topology, mode
and chooser, and writes the same figures as JSON; against the kubelet's CPU manager when the test environment built
its side (hack/testenv/kubernetes.sh install does, in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "hack/bench/cpu_choice.py"


def _run(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """The bench's output and figures; it may miss only its time goal (the machine may be busy while CI runs)."""
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode in (0, 1) and out.exists(), f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr}"
    report = json.loads(out.read_text())
    missed = [m for f in [*report["comparison"].values(), *report["variations"].values()] for m in f["missed"]]
    assert all(m.startswith("p99") for m in missed), f"goals missed: {missed}\n{done.stdout}"
    assert done.returncode == (1 if missed else 0)
    return done.stdout, report


def test_quick_mode_without_the_kubelet(tmp_path: Path) -> None:
    stdout, report = _run(tmp_path, "--no-kubelet", "--topology", "snc-4numa", "--topology", "hybrid-8p16e")
    assert report["allocations"] == 300 and not report["kubelet"]
    assert set(report["comparison"]) == {"snc-4numa/node", "snc-4numa/numa", "hybrid-8p16e/node"}
    for key, figures in report["comparison"].items():
        ours = figures["choosers"]["dra-cpu"]
        assert ours["placed"] == 300 and ours["needless"] == 0, key
        assert ours["whole"] == 100.0, key
        assert f"{key.split('/')[1]} dra-cpu" in stdout
    assert "snc-4numa/node/distributeAcrossNUMA" in report["variations"]


def test_quick_mode_against_the_kubelet(tmp_path: Path) -> None:
    found = subprocess.run(
        [str(ROOT / "hack/testenv/kubernetes.sh"), "cpu-assignment"], capture_output=True, text=True, check=False
    )
    if found.returncode:
        pytest.skip("the kubelet's side is not built: hack/testenv/kubernetes.sh install builds it (CI does)")
    stdout, report = _run(tmp_path)
    assert report["kubelet"]
    assert "many-small-l3-256/node" in report["comparison"] and "big-8numa/numa" in report["comparison"]
    for key, figures in report["comparison"].items():
        choosers = figures["choosers"]
        expected = {"dra-cpu", "kubelet", "kubelet-uncore"} | ({"kubelet-tm"} if key.endswith("/node") else set())
        assert set(choosers) == expected, key
        assert all(c["placed"] + c["rejected"] + c["conflicts"] == 300 for c in choosers.values()), key
    # The kubelet's static policy counts CPUs per core as CPUs / cores, which on cores of mixed width takes a core
    # with one free thread for a whole one: it hands out CPUs another container holds.
    assert report["comparison"]["hybrid-8p16e/node"]["choosers"]["kubelet"]["conflicts"] > 0
    assert "kubelet-uncore" in stdout
