#!/usr/bin/env python3
"""Crash safety in figures: kill -9 the driver at random points of prepare/unprepare streams and count, after every
restart, what went wrong. Run from the repository root:

    .venv/bin/python hack/bench/crash.py [--kills N] [--seed S]

Three streams of N restarts each (default 50; about 0.5 s per restart on 2 cores): `plain` (CPU claims on the
64-CPU big-8numa fixture), `hugepages` (CPU + hugepage claims that oversubscribe 32Mi pools) and `shrunken` (a
16-CPU node that turns SMT off, losing CPUs 8-15 and its hugepages, every 4 restarts, and gets them back).
Per stream it prints restarts survived, double bookings (goal 0), acknowledged claims lost (goal 0), CDI spec /
checkpoint mismatches (goal 0), and for information the acknowledged prepares and the claims reported as
unrestorable (dropped because their CPUs or pages vanished: reported, not lost). Exit 1 when a goal is missed.
The engine is tests/harness/crash.py, which tests/store/test_crash_safety.py asserts on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Run as a script: the repository root (for tests/harness) is not on the path by itself.
sys.path.insert(0, str(ROOT))

from tests.harness.crash import run_stream, streams  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="restarts per stream (default 50)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    ok = True
    print(f"{'stream':<10} {'restarts':>8} {'double bookings':>15} {'lost':>5} {'mismatches':>10} "
          f"{'acked':>6} {'reported':>8} {'seconds':>8}")  # fmt: skip
    for name in ("plain", "hugepages", "shrunken"):
        with tempfile.TemporaryDirectory(prefix="dra-cpu-crash-") as tmp:
            root = Path(tmp)
            start = time.perf_counter()
            f = run_stream(root, streams(root)[name], args.kills, seed=args.seed)
            seconds = time.perf_counter() - start
        good = f.restarts == args.kills and f.double_bookings == f.lost == f.mismatches == 0 and not f.failures
        ok = ok and good
        print(
            f"{name:<10} {f.restarts:>8} {f.double_bookings:>15} {f.lost:>5} {f.mismatches:>10} "
            f"{f.acknowledged:>6} {f.reported:>8} {seconds:>8.1f}  {'ok' if good else 'GOAL MISSED'}"
        )
        for failure in f.failures:
            print(f"    {failure}")
    print("goals: every restart survived, 0 double bookings, 0 acknowledged claims lost, 0 mismatches")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
