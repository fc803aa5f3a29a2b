"""Hand-over: a claim goes to the next pod its reservedFor lists once the pod it served is gone (core/sharing.py).

The kubelet prepares a claim once however many pods use it, so nothing tells the driver that a second pod reserved
it, or that the first one ended. What does tell it is the runtime: enforcement refuses the waiting pod's container,
and the kubelet retries it every ten seconds or so. Each refusal queues the claim here; a thread of its own (never
the runtime's) re-reads the claim from the API server and has the driver hand it over (Driver.follow) when its
reservedFor no longer lists the pod it served. The retry after that starts the container pinned.

The kubelet retries a refused container with a doubling back-off (10, 20, 40, 80 s and on), so a hand-over learnt
only from a refusal costs the waiting pod one more retry: refused once more after the holder ended, started at the
retry after. So the end of the holder is also learnt where the driver watches this node's pods (kube/pods.py):
when the pod a claim serves ends or is deleted while another pod waits for the claim, the claim is read at once,
and again every `interval`, up to CHASE_READS times, until the claim controller has dropped the pod from
reservedFor; the waiting pod's next retry then starts it.

A claim is re-read at most once per `interval` however many of its containers are refused, which keeps the reads
below the kubelet's own: it reads the claim at every retry of the waiting pod. Nothing is read while no pod waits.

What a re-read learns about a waiting pod that cannot hold the claim (its CPU limit would throttle it) is kept, and
enforcement adds it to the refusal the pod's events show, so that the user sees what to change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.sharing import Holding
from dra_cpu.driver import Snapshot
from dra_cpu.errors import DraCpuError
from dra_cpu.kube.api import NotFound

LOG = logging.getLogger("dra_cpu.handover")

INTERVAL_SECONDS = 2.0
"""The least time between two reads of one claim: the containers of a pod refused in one retry cost one read."""
CHASE_READS = 15
"""Reads of a waited-for claim after its holder ended, one per interval, while reservedFor still lists the holder:
the claim controller drops an ended pod within seconds, even on a busy control plane."""


class Claims(Protocol):
    """The driver, as hand-over uses it."""

    def snapshot(self) -> Snapshot: ...

    def follow(self, ref: ClaimRef) -> Holding | None: ...


class Handover:
    """`waiting()` from enforcement (any thread, never blocks); `run()` in a thread of its own until `stop`."""

    def __init__(
        self,
        claims: Claims,
        stop: threading.Event,
        interval: float = INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.claims = claims
        self.stop = stop
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queued: dict[str, float] = {}
        """claim uid -> when it may be read next."""
        self._last: dict[str, float] = {}
        """claim uid -> when it was last read."""
        self._unfit: dict[str, dict[str, str]] = {}
        """claim uid -> pod uid -> why that pod cannot hold the claim, as the last read found."""
        self._waited: set[str] = set()
        """Claims a pod waits for: one of its containers was refused since the claim last changed hands."""
        self._chased: dict[str, int] = {}
        """claim uid -> reads left while its holder has ended but reservedFor still lists it."""

    def waiting(self, claim_uid: str, pod_uid: str) -> str:
        """A container of pod `pod_uid` was refused the claim: the claim is read again soon. Returns why that pod
        cannot hold the claim when the last read found a reason ("" otherwise)."""
        with self._lock:
            self._waited.add(claim_uid)
            self._queue(claim_uid)
            return self._unfit.get(claim_uid, {}).get(pod_uid, "")

    def holder_ended(self, pod_uid: str) -> None:
        """The pod `pod_uid` ended or was deleted (from the pod watch, any thread, never blocks): each claim it holds
        that another pod waits for is read, now and then every interval, until it changes hands."""
        claims = self.claims.snapshot().ledger.claims
        with self._lock:
            for uid in self._waited:
                claim = claims.get(uid)
                if claim is not None and pod_uid in claim.pod_uids:
                    LOG.info(
                        "the pod a waited-for claim serves ended: reading the claim",
                        extra={"claimUID": uid, "claim": str(claim.ref), "podUID": pod_uid},
                    )
                    self._chased[uid] = CHASE_READS
                    self._queue(uid)

    def _queue(self, uid: str) -> None:
        """Under the lock: `uid` read once the interval since its last read is over."""
        if uid not in self._queued:
            self._queued[uid] = self._last.get(uid, -self.interval) + self.interval
            self._wake.notify()

    def run(self) -> None:
        while not self.stop.is_set():
            uid = self._next()
            if uid is not None:
                self._follow(uid)

    def close(self) -> None:
        """Wake run() so that it sees `stop`."""
        with self._lock:
            self._wake.notify_all()

    def _next(self) -> str | None:
        """The claim due first, once it is due; None when woken without one (or stopping)."""
        with self._lock:
            if not self._queued:
                self._wake.wait()
                return None
            uid, due = min(self._queued.items(), key=lambda item: item[1])
            delay = due - self.clock()
            if delay > 0:
                self._wake.wait(delay)
                return None
            del self._queued[uid]
            self._last[uid] = self.clock()
            return uid

    def _follow(self, uid: str) -> None:
        claim = self.claims.snapshot().ledger.claims.get(uid)
        held, failed = None, False
        if claim is not None:
            try:
                held = self.claims.follow(claim.ref)
            except NotFound:
                LOG.info("claim deleted: the kubelet unprepares it", extra={"claimUID": uid, "claim": str(claim.ref)})
            except DraCpuError as err:
                # The next refusal of the waiting pod, or the next read of a chased claim, tries again.
                LOG.warning("claim not followed", extra={"claimUID": uid, "claim": str(claim.ref), "reason": str(err)})
                failed = True
        prepared = self.claims.snapshot().ledger.claims
        with self._lock:
            if held is not None:
                self._unfit[uid] = dict(held.unfit)
            if claim is not None and (failed or (held is not None and held.claim.pod_uids == claim.pod_uids)):
                # Still with the pod it served: a chased claim is read again after the interval.
                left = self._chased.pop(uid, 0) - 1
                if left > 0:
                    self._chased[uid] = left
                    self._queue(uid)
            else:
                # Handed over, or no longer prepared: nobody waits for it until the next refusal.
                self._waited.discard(uid)
                self._chased.pop(uid, None)
            # What is kept of claims no longer prepared goes: the node's claims bound it.
            for gone in [c for c in self._last if c not in prepared and c not in self._queued]:
                self._last.pop(gone)
                self._unfit.pop(gone, None)
                self._waited.discard(gone)
                self._chased.pop(gone, None)
