#!/usr/bin/env python3
"""Runs every fuzz target of tests/harness/fuzz_targets.py (quantity, cpulist, cel, claim, prepare, pod, config,
explain) for N generated inputs each, after replaying its corpus (tests/fuzz/corpus/<target>/), and prints per target
the inputs tried, the crashes found (goal 0: an input that ends in anything but a value or a DraCpuError within the
target's time bound) and the slowest input. Exit code 1 when any target crashed.

    .venv/bin/python hack/bench/fuzz.py [--examples N] [--target NAME ...]

N defaults to 1000 per target; the CI pass (tests/fuzz) runs fewer, set by DRA_CPU_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Run as a script: the repository root (for tests/harness) is not on the path by itself.
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.harness.fuzz_targets import TARGETS, Target, crash  # noqa: E402


def fuzz(target: Target, examples: int) -> tuple[int, list[tuple[str, str]], float]:
    """(inputs tried, [(input, what went wrong)], slowest seconds): every input runs, crashes are collected."""
    crashes: list[tuple[str, str]] = []
    tried, slowest = 0, 0.0

    def one(value: Any) -> None:
        nonlocal tried, slowest
        tried += 1
        started = time.monotonic()
        problem = crash(target, value)
        slowest = max(slowest, time.monotonic() - started)
        if problem:
            crashes.append((repr(value)[:120], problem))

    for _, value in target.corpus():
        one(value)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        one(data.draw(target.strategy))

    run()
    return tried, crashes, slowest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--examples", type=int, default=1000, help="generated inputs per target (default 1000)")
    parser.add_argument("--target", action="append", choices=[t.name for t in TARGETS], help="only these targets")
    args = parser.parse_args()
    # The prepare target's driver logs every claim it refuses, which is every other fuzzed input: only the table.
    logging.getLogger("dra_cpu").setLevel(logging.CRITICAL)
    chosen = [t for t in TARGETS if not args.target or t.name in args.target]
    print(f"{'target':<10} {'inputs':>7} {'crashes':>8} {'slowest':>9} {'seconds':>8}")
    total = 0
    for target in chosen:
        started = time.monotonic()
        tried, crashes, slowest = fuzz(target, args.examples)
        print(f"{target.name:<10} {tried:>7} {len(crashes):>8} {slowest:>8.2f}s {time.monotonic() - started:>8.1f}")
        for value, problem in crashes[:5]:
            print(f"    {problem}\n        input {value}")
        total += len(crashes)
    print(f"crashes: {total} (goal 0)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
