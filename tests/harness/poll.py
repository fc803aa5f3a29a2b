"""The one way the harness and the tests wait: poll a check until it holds or a deadline passes, never a fixed sleep.

Real components (the API server, the scheduler, a kubelet, containerd, the guest) reach an outcome in their own time,
slower on a busy machine; a wait that fails says what it waited for, for how long, and what it saw last.

    pod = wait_until(lambda: scheduled_pod_or_none(), "pod p to be scheduled", timeout=90)
    wait_until(lambda: True if ok() else NotYet(seen()), "the container on CPUs 2-3")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 60.0
DEFAULT_INTERVAL = 0.1


@dataclass(frozen=True)
class NotYet:
    """What a check returns while its outcome is not there, carrying what it saw (shown if the wait fails)."""

    seen: object


class WaitTimeout(AssertionError):
    """A wait whose deadline passed (an AssertionError, so that a test reports it as a failed expectation)."""


def wait_until(
    check: Callable[[], T | NotYet | None],
    what: str,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = DEFAULT_INTERVAL,
    *,
    abort: Callable[[], str] | None = None,
    retry_on: tuple[type[BaseException], ...] = (),
    details: Callable[[], str] | None = None,
    error: Callable[[str], BaseException] = WaitTimeout,
) -> T:
    """Calls `check()` every `interval` seconds until it returns a value other than None, False or a NotYet, and
    returns that value. Exceptions of the types in `retry_on` count as "not yet" (a server that does not listen yet).

    Fails with `error(message)` (WaitTimeout by default) once `timeout` seconds have passed, or at once when `abort()`
    returns a reason (a process the wait depends on has exited). The message names `what`, the time waited, the last
    value or exception seen, and `details()` (a log's tail) when given."""
    start = time.monotonic()
    deadline = start + timeout
    seen: object = None
    while True:
        try:
            value = check()
            if value is not None and value is not False and not isinstance(value, NotYet):
                return value
            seen = value.seen if isinstance(value, NotYet) else value
        except retry_on as err:
            seen = err
        reason = abort() if abort is not None else ""
        if reason or time.monotonic() > deadline:
            waited = time.monotonic() - start
            head = (
                f"{reason} while waiting for {what}" if reason else f"timed out after {waited:.0f} s waiting for {what}"
            )
            message = f"{head}; last seen: {seen!r}"
            if details is not None:
                message += f"\n{details()}"
            raise error(message)
        time.sleep(interval)
