"""kill -9 at random points during streams of prepares and unprepares: after every restart no CPU is in two claims
and no hugepage pool is over what the machine reserves, every acknowledged claim has the same grant or, when the
machine it restarted on no longer has its CPUs or pages, is reported as unrestorable (never silently lost), and CDI
specs and checkpoint entries agree. The engine is tests/harness/crash.py; hack/bench/crash.py prints its figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.crash import run_stream, streams

# Restarts per stream: 200 for plain CPU claims (about 90 s on 2 cores), fewer for the two others.
KILLS = {"plain": 200, "hugepages": 60, "shrunken": 60}


@pytest.mark.parametrize("name", list(KILLS))
def test_kill_9_at_random_points(tmp_path: Path, name: str) -> None:
    figures = run_stream(tmp_path, streams(tmp_path)[name], KILLS[name])
    assert figures.failures == []
    assert (figures.restarts, figures.double_bookings, figures.lost, figures.mismatches) == (KILLS[name], 0, 0, 0)
    assert figures.acknowledged > 0, "the stream prepared something"
    if name == "shrunken":
        assert figures.reported > 0, "the shrinking node dropped some claims, and reported them"
