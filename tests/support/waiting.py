"""Polling with a deadline, for outcomes that real components reach in their own time (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], object], what: str, timeout: float = 20.0, interval: float = 0.05) -> None:
    """Until `check()` returns True, asking every `interval` seconds; on timeout the failure names `what` and the last
    value seen."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last is True:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {last!r} after {timeout}s")
        time.sleep(interval)
