"""Prepare and unprepare: read the claim, decide (pure), then apply the decision with rollback.

Apply order for prepare: checkpoint, CDI spec, enforcement. The checkpoint comes first because it is the truth
a restarted driver trusts: a crash after it leaves a claim whose CDI spec start-up rewrites; a crash before it
leaves nothing. Unprepare removes the CDI spec first, so a stale spec can never point at CPUs given to another
claim, then the checkpoint entry.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dra_cpu.core import cdi_spec
from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.cdi_spec import CDIError
from dra_cpu.core.claims import ClaimRef, ClaimRequest, PodRef, parse_claim
from dra_cpu.core.cpu_quota import ThrottledClaim, throttled
from dra_cpu.core.devices import Device, DeviceConfig, device_index
from dra_cpu.core.state import PreparedClaim, State, decide, restore
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError
from dra_cpu.kube.api import ClusterAPI, NotFound
from dra_cpu.logs import OperationLog, operation
from dra_cpu.store.cdi_files import CDIStore
from dra_cpu.store.checkpoint import Checkpoint, CheckpointError, CheckpointFile

LOG = logging.getLogger("dra_cpu.driver")


class Enforcer(Protocol):
    """What keeps the decision true in running containers (the NRI plugin); None in `--enforcement none`."""

    def check_ready(self) -> None:
        """Raise a DraCpuError (retriable) when enforcement is down and prepares must wait."""

    def claims_changed(self, state: State) -> None:
        """The set of prepared claims changed: shrink or regrow the shared pool (never blocks on the runtime)."""


class Recorder(Protocol):
    """Where prepare and unprepare outcomes are counted (the metrics)."""

    def record_prepare(self, ok: bool, seconds: float) -> None: ...

    def record_unprepare(self, ok: bool) -> None: ...

    def record_new_claim(self, cpus: int) -> None: ...


@dataclass(frozen=True)
class PreparedResult:
    """What the kubelet gets for one claim: the devices with their CDI ids, or an error it shows the user."""

    claim: PreparedClaim | None = None
    error: str = ""
    # The claim as read for this prepare (request names with subrequests, the pod's claim name): device metadata.
    request: ClaimRequest | None = None


@dataclass
class Driver:
    api: ClusterAPI
    config: DeviceConfig
    topology: Topology
    devices: tuple[Device, ...]
    checkpoint: CheckpointFile
    cdi_store: CDIStore
    boot_id: str
    default_policy: AllocationPolicy = field(default_factory=AllocationPolicy)
    enforcer: Enforcer | None = None
    cdi_hooks: tuple[dict[str, object], ...] = ()
    recorder: Recorder | None = None
    state: State = field(default_factory=State)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- start-up -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the checkpoint (or rebuild from our CDI specs), check it against this node (restore()), make the
        CDI folder agree with it, save it. Claims the node cannot honour are reported, never fatal."""
        log = operation(LOG, "start")
        self._clean_up_leftovers(log)
        try:
            loaded = self.checkpoint.load()
        except CheckpointError as err:
            log.error(
                "checkpoint is corrupt; rebuilding the prepared claims from CDI specs", extra={"reason": str(err)}
            )
            loaded = Checkpoint(self._state_from_cdi(log), boot_id="")
        on_disk = loaded.state if loaded else State()
        if loaded and loaded.boot_id and loaded.boot_id != self.boot_id:
            log.info("node rebooted since the checkpoint: rewriting CDI specs", extra={"claims": len(on_disk.claims)})
        state = restore(on_disk.claims.values(), self.topology, on_disk.unrestorable.values())
        for uid, lost in state.unrestorable.items():
            if uid not in on_disk.unrestorable:
                log.error(
                    "claim cannot be restored on this node: it is dropped and its prepares are refused",
                    extra={"claimUID": uid, "claim": str(lost.ref), "reason": lost.reason},
                )
        with self._lock:
            self._reconcile_cdi(state, log)
            self.checkpoint.save(Checkpoint(state, self.boot_id))
            self.state = state
        log.info(
            "state loaded",
            extra={
                "claims": len(state.claims),
                "allocated": str(state.allocated_cpus),
                "unrestorable": len(state.unrestorable),
            },
        )

    def _clean_up_leftovers(self, log: OperationLog) -> None:
        """Make the state folder ours alone (0700) and remove the temp files of writes a kill interrupted."""
        try:
            self.checkpoint.secure()
            removed = [*self.checkpoint.remove_leftovers(), *self.cdi_store.remove_leftovers()]
        except OSError as err:
            raise DraCpuError(f"cannot clean up {err.filename}: {err.strerror}") from None
        for path in removed:
            log.info("removed the temp file of an interrupted write", extra={"path": str(path)})

    def _state_from_cdi(self, log: OperationLog) -> State:
        claims = {}
        for uid in self.cdi_store.uids():
            try:
                env = cdi_spec.env_of_spec(self.cdi_store.read(uid))
                claims[uid] = cdi_spec.claim_from_env(env, uid, self.config.node_name)
            except CDIError as err:
                log.error("CDI spec unreadable: its claim is not restored", extra={"claimUID": uid, "reason": str(err)})
        return State(claims)

    def _reconcile_cdi(self, state: State, log: OperationLog) -> None:
        """Every prepared claim has exactly its spec, and no spec of ours is left without a claim."""
        for claim in state.claims.values():
            self.cdi_store.write(claim.uid, self._spec(claim))
        for uid in set(self.cdi_store.uids()) - set(state.claims):
            log.info("removing orphaned CDI spec", extra={"claimUID": uid})
            self.cdi_store.remove(uid)

    def _spec(self, claim: PreparedClaim) -> dict[str, object]:
        return cdi_spec.build_spec(self.config.driver_name, claim, claim.mems(self.topology), self.cdi_hooks)

    # --- topology -------------------------------------------------------------------------------------------

    def set_topology(self, topology: Topology, devices: tuple[Device, ...]) -> None:
        with self._lock:
            self.topology, self.devices = topology, devices

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
            if self.enforcer is not None:
                self.enforcer.check_ready()
            log.debug("reading the claim")
            obj = self.api.get_claim(ref.namespace, ref.name)
            request = parse_claim(
                obj, ref, driver=self.config.driver_name, pool=self.config.node_name, default_policy=self.default_policy
            )
            log = log.bind(pods=",".join(request.pod_uids))
            pods = self._reserving_pods(ref.namespace, request.pods, log)
            with self._lock:
                claim = decide(
                    self.state,
                    request,
                    self.topology,
                    device_index(self.devices),
                    cpu_capacity=self.config.cpu_capacity,
                    memory_capacity=self.config.memory_capacity,
                    floor=self.config.shared_floor,
                )
                problems = [p for pod in pods for p in throttled(pod, ref.name, len(claim.cpus))] if claim.cpus else []
                if problems:
                    raise ThrottledClaim("; ".join(problems))
                if self.state.claims.get(claim.uid) == claim:
                    # A repeat (kubelet retry or restart): same CPUs. The spec may be gone after a reboot; when it
                    # is there and right it is left alone, so a retry succeeds on a full or read-only CDI folder.
                    self._ensure_spec(claim)
                    log.info("already prepared", extra={"cpus": str(claim.cpus)})
                    return PreparedResult(claim, request=request)
                self._apply(self.state.with_claim(claim), write=claim, log=log)
            if self.recorder is not None:
                self.recorder.record_new_claim(len(claim.cpus))
            log.info("prepared", extra={"cpus": str(claim.cpus), "mems": str(claim.mems(self.topology))})
            return PreparedResult(claim, request=request)
        except NotFound:
            return self._failed(log, f"claim {ref} not found on the API server")
        except DraCpuError as err:
            return self._failed(log, str(err))

    def _reserving_pods(self, namespace: str, refs: Iterable[PodRef], log: OperationLog) -> list[dict[str, Any]]:
        """The pods the claim is reserved for, as the API server has them now: their CPU limits decide whether
        the claim's CPUs can be used at all (core/cpu_quota). A pod gone or replaced has no container to check."""
        pods = []
        for pod in refs:
            try:
                obj = self.api.get_pod(namespace, pod.name) if pod.name else None
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
                claim = self.state.claims.get(ref.uid)
                self.cdi_store.remove(ref.uid)
                if ref.uid in self.state.unrestorable:
                    # Its report is done: the kubelet let go of the claim.
                    self._apply(self.state.without(ref.uid), write=None, log=log)
                    log.info("unprepared a claim that could not be restored")
                    return ""
                if claim is None:
                    log.info("not prepared here; nothing to do")
                    return ""
                try:
                    self._apply(self.state.without(ref.uid), write=None, log=log)
                except DraCpuError:
                    # The claim stays prepared (its CPUs are still held): so does its spec, until a retry succeeds.
                    self._restore_spec(claim, log)
                    raise
            log.info("unprepared", extra={"cpus": str(claim.cpus)})
            return ""
        except DraCpuError as err:
            log.error("unprepare failed", extra={"reason": str(err)})
            return str(err)

    def _apply(self, new: State, write: PreparedClaim | None, log: OperationLog) -> None:
        """Checkpoint, then CDI spec, then enforcement; undo the earlier steps when a later one fails."""
        old = self.state
        try:
            self.checkpoint.save(Checkpoint(new, self.boot_id))
        except OSError as err:
            raise DraCpuError(f"cannot write checkpoint {self.checkpoint.path}: {err.strerror}") from None
        try:
            if write is not None:
                self.cdi_store.write(write.uid, self._spec(write))
        except CDIError:
            self._rollback(old, log)
            raise
        self.state = new
        if self.enforcer is not None:
            self.enforcer.claims_changed(new)

    def _ensure_spec(self, claim: PreparedClaim) -> None:
        spec = self._spec(claim)
        try:
            # Compared as JSON reads it back (lists, not tuples).
            if self.cdi_store.read(claim.uid) == json.loads(json.dumps(spec)):
                return
        except CDIError:
            pass  # missing or unreadable: written below
        self.cdi_store.write(claim.uid, spec)

    def _restore_spec(self, claim: PreparedClaim, log: OperationLog) -> None:
        try:
            self.cdi_store.write(claim.uid, self._spec(claim))
        except CDIError as err:
            # Safe either way: a missing spec points at nothing; start-up and a repeated prepare rewrite it.
            log.error("could not restore the CDI spec of a claim still prepared", extra={"reason": str(err)})

    def _rollback(self, old: State, log: OperationLog) -> None:
        try:
            self.checkpoint.save(Checkpoint(old, self.boot_id))
        except OSError as err:
            # The checkpoint now lists a claim without a spec: start-up rewrites the spec, and the kubelet's
            # retry of this prepare returns the same CPUs, so nothing is lost.
            log.error("rollback of the checkpoint failed", extra={"reason": err.strerror})

    @staticmethod
    def _failed(log: OperationLog, message: str) -> PreparedResult:
        log.warning("prepare failed", extra={"reason": message})
        return PreparedResult(error=message)
