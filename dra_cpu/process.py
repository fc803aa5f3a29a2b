"""The daemon's process: its shutdown signals and the deadline by which it is gone.

SIGTERM or SIGINT starts one shutdown (it sets `stop`); another SIGTERM during it is only logged; a third signal, or
a SIGINT during the shutdown, ends the process at once (exit 128 + the signal's number). Once a shutdown starts, the
process is gone within SHUTDOWN_SECONDS whatever else hangs (a request to a dead API server, a stuck disk): the
checkpoint is built to survive an exit at any instant.

Only a daemon running on the main thread owns its process; one run in a thread (the demo, tests) leaves signals and
the process alone.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

LOG = logging.getLogger("dra_cpu.daemon")

# From the first stop request to the end of the process, at most (the kubelet's grace period is 30 s by default).
SHUTDOWN_SECONDS = 10.0
# The signal that ends the process at once, counting the one that started the shutdown.
FORCE_EXIT_SIGNALS = 3
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def end_process(code: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _ignore_in_handler(signum: int, frame: object) -> None:
    """The Python-level handler of SIGTERM and SIGINT: nothing at all (see Process.install_signals)."""


class Process:
    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        # Set when the daemon runs on the main thread: only then may it end the process.
        self.owned = False
        # What the exit deadline ends the process with: a failure until the shutdown went as it should.
        self.exit_code = 1
        self._deadline_armed = threading.Lock()

    def install_signals(self) -> None:
        """Re-entrancy safe: Python runs a signal handler on the main thread between any two bytecodes, also while
        that thread holds a lock (inside Event.set, a logging call, shutdown itself), so the handler must take none.
        It does nothing; the interpreter's C handler writes each signal's number to a pipe that a thread of ours
        reads, and everything else (logging, setting `stop`, counting, forcing the exit) happens on that thread."""
        if threading.current_thread() is not threading.main_thread():
            return  # the demo and tests run a daemon in a thread; the process and its signals are not ours
        self.owned = True
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in SHUTDOWN_SIGNALS:
            signal.signal(sig, _ignore_in_handler)
        threading.Thread(target=self._read_signals, args=(read_fd,), name="signals", daemon=True).start()

    def _read_signals(self, read_fd: int) -> None:
        received = 0
        while data := os.read(read_fd, 64):
            for number in data:
                if number not in SHUTDOWN_SIGNALS:
                    continue
                received += 1
                name = signal.Signals(number).name
                if received == 1:
                    LOG.info(f"{name} received: shutting down", extra={"boundSeconds": SHUTDOWN_SECONDS})
                    self.stop.set()
                    self.arm_exit_deadline()
                elif received >= FORCE_EXIT_SIGNALS or number == signal.SIGINT:
                    LOG.error(f"{name} during the shutdown: exiting at once", extra={"exitCode": 128 + number})
                    end_process(128 + number)
                else:
                    LOG.warning(
                        f"{name} received again: already shutting down; one more, or SIGINT, exits at once",
                    )

    def arm_exit_deadline(self) -> None:
        """However the shutdown goes, the process ends SHUTDOWN_SECONDS after it started: a worker thread blocked
        in a request (a dead API server) would otherwise hold the interpreter's exit, which joins them all."""
        if self.owned and self._deadline_armed.acquire(blocking=False):
            threading.Thread(target=self._exit_by_deadline, name="exit-deadline", daemon=True).start()

    def _exit_by_deadline(self) -> None:
        threading.Event().wait(SHUTDOWN_SECONDS)
        busy = sorted({t.name for t in threading.enumerate() if t.is_alive() and not t.daemon} - {"MainThread"})
        LOG.error(
            "shutdown did not end in time: exiting now",
            extra={"boundSeconds": SHUTDOWN_SECONDS, "busyThreads": ",".join(busy), "exitCode": self.exit_code},
        )
        end_process(self.exit_code)

    def exit(self, code: int) -> None:
        """End the process with `code` when the daemon owns it; otherwise return.

        Not through the interpreter's exit: that waits for every worker thread (one blocked on a dead API server
        holds it for as long as its request), and it puts the default signal actions back before the process is
        gone, so that a SIGTERM in that window kills it with a signal instead of the shutdown's exit code. A
        thread left behind holds nothing that must still be written: a prepare answers only after its checkpoint
        is on disk, and the checkpoint survives an exit at any instant."""
        if self.owned:
            end_process(code)
