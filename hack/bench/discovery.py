#!/usr/bin/env python3
"""Prints how long topology discovery takes: the 64-CPU fixture (goal <= 30 ms) and a generated
1024-CPU / 16-node tree (goal <= 300 ms), median of 20 runs each. Run with .venv/bin/python."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Run as a script: the repository root (for tests/harness) is not on the path by itself.
sys.path.insert(0, str(ROOT))

from dra_cpu.node.sysfs import read_topology  # noqa: E402
from tests.harness.synthetic_sysfs import uniform_machine, write_tree  # noqa: E402


def median_ms(root: Path, runs: int = 20) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        read_topology(root)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    fixture = ROOT / "tests/fixtures/sysfs/big-8numa"
    with tempfile.TemporaryDirectory() as tmp:
        cpus, nodes = uniform_machine(sockets=4, nodes_per_socket=4, cores_per_node=32, threads=2, l3_per_node=2)
        big = write_tree(Path(tmp), cpus, nodes)
        rows = [
            ("big-8numa fixture (64 CPUs, 8 nodes)", median_ms(fixture), 30.0),
            ("generated (1024 CPUs, 16 nodes)", median_ms(big), 300.0),
        ]
    ok = True
    for name, ms, goal in rows:
        verdict = "ok" if ms <= goal else "OVER GOAL"
        ok = ok and ms <= goal
        print(f"discovery {name:<40} median {ms:7.1f} ms   goal <= {goal:.0f} ms   {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
