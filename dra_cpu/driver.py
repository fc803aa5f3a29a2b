"""Prepare, unprepare and hand-over: read the claim, then, under one lock, decide (core/grant.py and
core/sharing.py, pure) and have the node made to match the new ledger (reconciler.py, with rollback). Everything
else reads the driver through `snapshot()`: the node view and the ledger of one moment, both immutable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.claims import ClaimRef, ClaimRequest, PodRef, parse_claim
from dra_cpu.core.desired import cdi_ids
from dra_cpu.core.device_metadata import MetadataError, claim_metadata
from dra_cpu.core.grant import grant
from dra_cpu.core.ledger import ClaimMetadata, Ledger, PreparedClaim
from dra_cpu.core.memory_limit import bound_memory
from dra_cpu.core.node_view import NodeView
from dra_cpu.core.pod_limits import PodLimitsError
from dra_cpu.core.sharing import Holding, hold, holder
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError
from dra_cpu.kube.api import ClusterAPI, NotFound
from dra_cpu.logs import OperationLog, operation
from dra_cpu.reconciler import Enforcer, Reconciler

LOG = logging.getLogger("dra_cpu.driver")


class Recorder(Protocol):
    """Where prepare and unprepare outcomes are counted (the metrics)."""

    def record_prepare(self, ok: bool, seconds: float) -> None: ...

    def record_unprepare(self, ok: bool) -> None: ...

    def record_new_claim(self, cpus: int) -> None: ...


@dataclass(frozen=True)
class Snapshot:
    """The node as the driver knows it at one moment: what it has and publishes (view), what claims hold (ledger)."""

    view: NodeView
    ledger: Ledger


@dataclass(frozen=True)
class PreparedResult:
    """What the kubelet gets for one claim: the devices with their CDI ids, or an error it shows the user."""

    claim: PreparedClaim | None = None
    error: str = ""
    # Per device of `claim`: the CDI device ids the runtime gets (core/desired.cdi_ids).
    cdi_ids: tuple[tuple[str, ...], ...] = ()


class Driver:
    def __init__(
        self, api: ClusterAPI, view: NodeView, reconciler: Reconciler, recorder: Recorder | None = None
    ) -> None:
        self.api = api
        self.reconciler = reconciler
        self.recorder = recorder
        # Replaced whole under the lock, read without it: a reader gets one moment's view and ledger.
        self._now = Snapshot(view, Ledger())
        self._lock = threading.Lock()

    def snapshot(self) -> Snapshot:
        return self._now

    # --- start-up, topology, enforcement --------------------------------------------------------------------

    def start(self) -> None:
        """Recover the ledger and make the node match it (reconciler.recover) before anything is served."""
        with self._lock:
            view = self._now.view
            self._now = Snapshot(view, self.reconciler.recover(view))

    def set_topology(self, topology: Topology) -> NodeView:
        """Re-discovery found `topology`: the view with its devices (DeviceConfigError when none can be built),
        which the pins follow at once."""
        view = self._now.view.with_topology(topology)
        with self._lock:
            self._now = Snapshot(view, self._now.ledger)
            self.reconciler.repin(self._now.ledger, view)
        return view

    def enforce_with(self, enforcer: Enforcer) -> None:
        """From now on `enforcer` gets the pins after every change (and now)."""
        with self._lock:
            self.reconciler.attach(enforcer, self._now.ledger, self._now.view)

    # --- prepare / unprepare --------------------------------------------------------------------------------

    def prepare(self, refs: Iterable[ClaimRef]) -> dict[str, PreparedResult]:
        results = {}
        for ref in refs:
            start = time.perf_counter()
            results[ref.uid] = result = self._prepare_one(ref)
            if self.recorder is not None:
                self.recorder.record_prepare(result.claim is not None, time.perf_counter() - start)
        return results

    def _prepare_one(self, ref: ClaimRef) -> PreparedResult:
        log = operation(LOG, "prepare", claimUID=ref.uid, claim=str(ref))
        try:
            self.reconciler.check_ready()
            log.debug("reading the claim")
            request = self._read_claim(ref)
            settings = self._now.view.settings
            log = log.bind(pods=",".join(request.pod_uids))
            pods = self._reserving_pods(ref.namespace, request.pods, log)
            metadata = self._metadata(request, settings.device_metadata, log)
            with self._lock:
                now = self._now
                granted = grant(now.ledger, request, now.view, metadata)
                held = hold(granted, request.pod_uids, pods, bound_memory(granted, now.view))
                claim = held.claim
                if request.pods and not claim.pod_uids:
                    # No pod that reserved the claim has limits that fit it: the prepare fails, saying why.
                    raise PodLimitsError("; ".join(held.unfit.values()))
                repeat = now.ledger.claims.get(claim.uid) == claim
                metadata_ids = self._commit(now, claim, log)
            if repeat:
                # A kubelet retry or restart: the same CPUs, the files checked and left alone when right.
                log.info("already prepared", extra={"cpus": str(claim.cpus)})
            else:
                if self.recorder is not None:
                    self.recorder.record_new_claim(len(claim.cpus))
                log.info("prepared", extra={"cpus": str(claim.cpus), "mems": str(claim.mems(now.view.topology))})
            return PreparedResult(claim, cdi_ids=cdi_ids(claim, settings.driver_name, metadata_ids))
        except NotFound:
            return self._failed(log, f"claim {ref} not found on the API server")
        except DraCpuError as err:
            return self._failed(log, str(err))

    def follow(self, ref: ClaimRef) -> Holding | None:
        """Hand the prepared claim `ref` over when its reservedFor no longer lists the pod it serves
        (core/sharing.py): the kubelet prepares a claim once, however many pods use it, so this is how a pod that
        reserved it later gets it. Reads the claim, and the reserving pods only when the claim changes hands. None
        when the claim is not prepared here; DraCpuError when it cannot be read or the node made to match."""
        log = operation(LOG, "handover", claimUID=ref.uid, claim=str(ref))
        prepared = self._now.ledger.claims.get(ref.uid)
        if prepared is None:
            return None
        request = self._read_claim(ref)
        if holder(prepared.pod_uids, request.pod_uids) == prepared.pod_uids:
            return Holding(prepared, {})
        waiting = [pod for pod in request.pods if pod.uid not in prepared.pod_uids]
        pods = self._reserving_pods(ref.namespace, waiting, log)
        with self._lock:
            now = self._now
            before = now.ledger.claims.get(ref.uid)
            if before is None:
                return None
            held = hold(before, request.pod_uids, pods, bound_memory(before, now.view))
            if held.claim != before:
                self._commit(now, held.claim, log)
        for uid, reason in held.unfit.items():
            log.warning("pod cannot hold the claim", extra={"podUID": uid, "reason": reason})
        if held.claim != before:
            log.info(
                "claim handed over",
                extra={"from": ",".join(before.pod_uids), "to": ",".join(held.claim.pod_uids) or "no pod"},
            )
        return held

    def _read_claim(self, ref: ClaimRef) -> ClaimRequest:
        settings = self._now.view.settings
        return parse_claim(
            self.api.get_claim(ref.namespace, ref.name),
            ref,
            driver=settings.driver_name,
            pool=settings.pool,
            default_policy=AllocationPolicy(),
        )

    def _commit(self, now: Snapshot, claim: PreparedClaim, log: OperationLog) -> dict[str, str]:
        """Under the lock: the ledger with `claim`, made the node's (the claim's metadata CDI ids are returned)."""
        ledger = now.ledger.with_claim(claim)
        metadata_ids = self.reconciler.reconcile(now.ledger, ledger, now.view, claim.ref, log)
        self._now = Snapshot(now.view, ledger)
        return metadata_ids

    @staticmethod
    def _metadata(request: ClaimRequest, enabled: bool, log: OperationLog) -> ClaimMetadata | None:
        """What the claim's device metadata files will name; None with the feature off, or (logged) when its
        names cannot be paths: the claim is then prepared without them."""
        if not enabled:
            return None
        try:
            return claim_metadata(request)
        except MetadataError as err:
            log.error(
                "device metadata not written: the claim's containers start without the metadata file",
                extra={"reason": str(err)},
            )
            return None

    def _reserving_pods(self, namespace: str, refs: Iterable[PodRef], log: OperationLog) -> list[dict[str, Any]]:
        """The pods the claim is reserved for, as the API server has them now: their limits decide whether the
        claim can be used by them at all (core/sharing.py). A pod gone or replaced has no container to check."""
        pods = []
        for pod in refs:
            try:
                obj = self.api.get_pod(namespace, pod.name, pod.uid) if pod.name else None
            except NotFound:
                obj = None
            if obj is None or obj.get("metadata", {}).get("uid") != pod.uid:
                log.debug("reserving pod not found: no limits to check", extra={"pod": f"{namespace}/{pod.name}"})
                continue
            pods.append(obj)
        return pods

    def unprepare(self, refs: Iterable[ClaimRef]) -> dict[str, str]:
        """Claim uid -> error ("" when done). Unknown claims succeed: the kubelet may repeat an unprepare."""
        results = {ref.uid: self._unprepare_one(ref) for ref in refs}
        if self.recorder is not None:
            for error in results.values():
                self.recorder.record_unprepare(not error)
        return results

    def _unprepare_one(self, ref: ClaimRef) -> str:
        log = operation(LOG, "unprepare", claimUID=ref.uid, claim=str(ref))
        try:
            with self._lock:
                now = self._now
                claim = now.ledger.claims.get(ref.uid)
                lost = ref.uid in now.ledger.unrestorable
                ledger = now.ledger.without(ref.uid)
                # Also for a claim not prepared here: files a crash left behind go.
                self.reconciler.reconcile(now.ledger, ledger, now.view, ref, log)
                self._now = Snapshot(now.view, ledger)
        except DraCpuError as err:
            log.error("unprepare failed", extra={"reason": str(err)})
            return str(err)
        if lost:
            # Its report is done: the kubelet let go of the claim.
            log.info("unprepared a claim that could not be restored")
        elif claim is None:
            log.info("not prepared here; nothing to do")
        else:
            log.info("unprepared", extra={"cpus": str(claim.cpus)})
        return ""

    @staticmethod
    def _failed(log: OperationLog, message: str) -> PreparedResult:
        log.warning("prepare failed", extra={"reason": message})
        return PreparedResult(error=message)
