"""What every piece of the harness is: something started and stopped, by hand or as a context manager.

    with ControlPlane(state_dir) as plane, RealNode(plane) as node:
        ...

`start()` raises Unavailable when the piece cannot run on this machine at all (not installed, not root): pytest
fixtures skip on it, a script says it. Any other failure to start raises the piece's own error, carrying the log tail
that says why. `stop()` is safe after a start that failed part-way, and twice; it leaves no process, mount or file
behind.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Unavailable(Exception):
    """A piece that cannot run here (not installed, not root, no qemu): the message says what to install or do."""


class Component:
    """A piece with `start()` and `stop()`; `with` starts it, and stops it on the way out (also when start failed)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
