"""The shared-pool updater: when claims change, every running container whose pin changed gets it through
Runtime.UpdateContainers, in batches, from a thread of its own (never from a runtime callback, see nri/stub.py)."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from dra_cpu.logs import operation
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.stub import Stub
from dra_cpu.nri.transport import TransportError

LOG = logging.getLogger("dra_cpu.nri")

UPDATE_BATCH = 25
"""Containers per UpdateContainers call: the runtime applies them one by one (~20 ms each), and a call must end
well inside the timeout."""
RETRY_SECONDS = 1.0


class Pins(Protocol):
    def pending_updates(self) -> list[api.ContainerUpdate]:
        """The running containers whose pin differs from the one last applied, marked applied."""
        ...

    def update_failed(self, failed: list[api.ContainerUpdate]) -> None:
        """These were not applied: they are pending again."""
        ...


class SharedPoolUpdater:
    def __init__(self, stub: Stub, pins: Pins) -> None:
        self._stub = stub
        self._pins = pins
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nri-update", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread.is_alive():
            self._thread.join()

    def poke(self) -> None:
        """Pins may have changed: push what differs, soon, from the updater's thread."""
        self._dirty.set()

    def _loop(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            if self._stop.is_set():
                return
            if not self._stub.ready.is_set():
                continue  # Synchronize on (re)connection reconciles everything.
            self.push_updates()

    def push_updates(self) -> int:
        """Bring every running container to its pin, in batches; returns how many were updated. A batch that
        fails is retried after RETRY_SECONDS (its containers are pending again, so they are in the retry)."""
        updates = self._pins.pending_updates()
        done = 0
        for start in range(0, len(updates), UPDATE_BATCH):
            done += self._push_batch(updates[start : start + UPDATE_BATCH])
        if done < len(updates) and not self._stop.wait(RETRY_SECONDS):
            self._dirty.set()
        return done

    def _push_batch(self, updates: list[api.ContainerUpdate]) -> int:
        log = operation(LOG, "update-containers", containers=len(updates))
        try:
            failed = self._stub.update_containers(updates)
        except TransportError as err:
            (log.info if self._stop.is_set() else log.error)("UpdateContainers failed", extra={"reason": str(err)})
            failed = updates
        if failed:
            self._pins.update_failed(failed)
            log.warning(
                "runtime did not update some containers", extra={"failed": ",".join(f.container_id for f in failed)}
            )
        log.info("containers updated")
        return len(updates) - len(failed)
