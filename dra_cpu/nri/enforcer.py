"""dra-cpu's NRI enforcement: claimed containers are pinned to their claims, every other container stays on the
shared pool. The decisions are core/entitlement.py's; this module keeps the runtime's container table, answers
the runtime through the NRI stub and hands changed pins to the shared-pool updater.

The container table is read and written under one lock; the runtime's callbacks only touch the table, so each
answer takes well under a millisecond.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dra_cpu.core import entitlement as policy
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.state import State
from dra_cpu.core.topology import Topology
from dra_cpu.errors import DraCpuError
from dra_cpu.logs import operation
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.stub import Stub, StubConfig
from dra_cpu.nri.transport import FAILED_PRECONDITION, MethodError
from dra_cpu.nri.updater import SharedPoolUpdater

LOG = logging.getLogger("dra_cpu.nri")

EVENTS = (api.CREATE_CONTAINER, api.UPDATE_CONTAINER, api.STOP_CONTAINER, api.REMOVE_CONTAINER)
DEFAULT_SOCKET = Path("/var/run/nri/nri.sock")


@dataclass(frozen=True)
class NriConfig:
    socket: Path = DEFAULT_SOCKET
    plugin_name: str = "dra-cpu"
    plugin_index: str = "00"
    reserved_cpus: CPUSet = field(default_factory=CPUSet)
    strict_reserved: bool = False
    grace_seconds: float = 10.0
    """How long enforcement may be down (the runtime restarting) before prepares fail."""
    call_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0

    def __post_init__(self) -> None:
        self.stub.check()

    @property
    def stub(self) -> StubConfig:
        return StubConfig(
            self.socket, self.plugin_name, self.plugin_index, self.call_timeout, self.backoff_initial, self.backoff_max
        )


@dataclass
class NriCounters:
    """Monotonic counters for the metrics; written under the enforcer's lock."""

    forged_env: int = 0
    """Containers that carried a claim's env without being entitled to it (they got the shared pool)."""
    update_failures: int = 0
    connects: int = 0
    """Connections that reached synchronization (the first, then one per reconnection)."""


@dataclass(frozen=True)
class _Tracked:
    info: policy.ContainerInfo
    running: bool = True


def _resources(pin: policy.Pin) -> api.LinuxResources:
    resources = api.LinuxResources(cpu=api.LinuxCPU(cpus=str(pin.cpus), mems=str(pin.mems) if pin.mems else ""))
    resources.hugepage_limits.extend(api.HugepageLimit(page_size=s, limit=b) for s, b in pin.hugepage_limits)
    return resources


def _update(container_id: str, pin: policy.Pin) -> api.ContainerUpdate:
    # A container may exit between our decision and the runtime's update: that must not fail the others.
    return api.ContainerUpdate(
        container_id=container_id, linux=api.LinuxContainerUpdate(resources=_resources(pin)), ignore_failure=True
    )


def _info(container: api.Container, pod: api.PodSandbox | None) -> policy.ContainerInfo:
    return policy.container_info(
        container.id,
        container.name,
        pod.uid if pod is not None else "",
        f"{pod.namespace}/{pod.name}" if pod is not None else f"sandbox {container.pod_sandbox_id}",
        container.env,
    )


class NriEnforcer:
    """The Enforcer of dra_cpu.driver: construct, `start()`, wait for `ready`, then serve; `stop()` at exit."""

    events = EVENTS

    def __init__(self, config: NriConfig, topology: Topology, state: State) -> None:
        self.config = config
        self.counters = NriCounters()
        self.stub = Stub(config.stub, self)
        self.updater = SharedPoolUpdater(self.stub, self)
        self._lock = threading.Lock()
        self._topology = topology
        self._pools = self._compute_pools(state, topology)
        self._containers: dict[str, _Tracked] = {}
        self._applied: dict[str, policy.Pin] = {}
        self._connected = False
        self._down_since = time.monotonic()
        self._synchronized_once = False

    @property
    def ready(self) -> threading.Event:
        """Set while connected to the runtime and synchronized; the kubelet plugin registers only after it."""
        return self.stub.ready

    @property
    def shared_cpus(self) -> CPUSet:
        return self._pools.shared

    def start(self) -> None:
        self.stub.start()
        self.updater.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def stop(self) -> None:
        self.updater.stop()
        self.stub.stop()

    # --- Enforcer (driver.py) ------------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.ready.is_set():
            return
        down = time.monotonic() - self._down_since
        if not self._synchronized_once or down > self.config.grace_seconds:
            raise DraCpuError(
                f"CPU pinning is not enforced: no NRI connection to the container runtime at {self.config.socket} "
                f"for {down:.0f}s; retry later (is NRI enabled in the runtime?)"
            )

    def claims_changed(self, state: State) -> None:
        with self._lock:
            self._pools = self._compute_pools(state, self._topology)
        self.updater.poke()

    def set_topology(self, topology: Topology) -> None:
        with self._lock:
            self._topology = topology
            self._pools = self._compute_pools(self._pools.state, topology)
        self.updater.poke()

    def _compute_pools(self, state: State, topology: Topology) -> policy.Pools:
        return policy.pools(state, topology, self.config.reserved_cpus, self.config.strict_reserved)

    # --- the runtime's calls (stub.Handler; on the transport's reader thread) ------------------------------

    def synchronize(
        self, pods: Sequence[api.PodSandbox], containers: Sequence[api.Container]
    ) -> list[api.ContainerUpdate]:
        by_id = {p.id: p for p in pods}
        updates = []
        with self._lock:
            self._containers = {}
            self._applied = {}
            for container in containers:
                if container.state not in (api.CONTAINER_CREATED, api.CONTAINER_RUNNING):
                    continue
                info = _info(container, by_id.get(container.pod_sandbox_id))
                self._containers[info.id] = _Tracked(info)
                pin = self._decide(info, "synchronize")
                if pin is not None:
                    self._applied[info.id] = pin
                    updates.append(_update(info.id, pin))
            self._synchronized_once = True
            self._connected = True
            self.counters.connects += 1
        LOG.info("synchronized with the runtime", extra={"containers": len(updates), "shared": str(self._pools.shared)})
        return updates

    def create_container(self, request: api.CreateContainerRequest) -> api.ContainerAdjustment:
        info = _info(request.container, request.pod)
        with self._lock:
            try:
                decision = policy.decide(info, self._pools)
            except policy.NoSharedCpus as err:
                LOG.error("refusing container: no shared CPU left", extra={"container": info.name, "pod": info.pod})
                raise MethodError(FAILED_PRECONDITION, str(err)) from None
            self._containers[info.id] = _Tracked(info)
            self._applied[info.id] = decision.pin
            self._report(info, decision, "create")
        return api.ContainerAdjustment(linux=api.LinuxContainerAdjustment(resources=_resources(decision.pin)))

    def update_container(self, request: api.UpdateContainerRequest) -> list[api.ContainerUpdate]:
        info = _info(request.container, request.pod)
        with self._lock:
            self._containers.setdefault(info.id, _Tracked(info))
            pin = self._decide(info, "update")
            if pin is None:
                return []
            self._applied[info.id] = pin
        return [_update(info.id, pin)]

    def stop_container(self, request: api.StopContainerRequest) -> None:
        with self._lock:
            tracked = self._containers.get(request.container.id)
            if tracked is not None:
                self._containers[request.container.id] = _Tracked(tracked.info, running=False)
            self._applied.pop(request.container.id, None)

    def remove_container(self, container_id: str) -> None:
        with self._lock:
            known = self._containers.pop(container_id, None)
            self._applied.pop(container_id, None)
        if known is None:
            LOG.info("removal of a container never seen", extra={"containerID": container_id})

    def disconnected(self, stopping: bool) -> None:
        with self._lock:
            if self._connected:
                self._down_since = time.monotonic()
            self._connected = False
            self._applied.clear()
        if not stopping:
            LOG.warning("NRI connection lost: reconnecting", extra={"graceSeconds": self.config.grace_seconds})

    # --- pins for the shared-pool updater (updater.Pins) ---------------------------------------------------

    def pending_updates(self) -> list[api.ContainerUpdate]:
        updates = []
        with self._lock:
            for cid, tracked in self._containers.items():
                if not tracked.running:
                    continue
                pin = self._decide(tracked.info, "")
                if pin is not None and self._applied.get(cid) != pin:
                    self._applied[cid] = pin
                    updates.append(_update(cid, pin))
        return updates

    def update_failed(self, failed: list[api.ContainerUpdate]) -> None:
        with self._lock:
            for update in failed:
                self._applied.pop(update.container_id, None)
            self.counters.update_failures += len(failed)

    # --- decisions (under the lock) ------------------------------------------------------------------------

    def _decide(self, info: policy.ContainerInfo, why: str) -> policy.Pin | None:
        """The pin, or None (logged) when the shared pool is empty and nothing can be right. `why` names the
        event for the log; empty for the updater's recomputations, which would only repeat it."""
        try:
            decision = policy.decide(info, self._pools)
        except policy.NoSharedCpus as err:
            LOG.error("container left as it is", extra={"container": info.name, "pod": info.pod, "reason": str(err)})
            return None
        if why:
            self._report(info, decision, why)
        return decision.pin

    def _report(self, info: policy.ContainerInfo, decision: policy.Decision, why: str) -> None:
        log = operation(LOG, why, containerID=info.id, container=info.name, pod=info.pod, podUID=info.pod_uid)
        for rejection in decision.rejected:
            if why == "create":
                self.counters.forged_env += 1
            log.warning(
                "container carries a claim's cpuset it is not entitled to: it gets the shared pool",
                extra={"claimUID": rejection.claim_uid, "reason": rejection.reason},
            )
        if decision.pin.claims:
            log.info(
                "pinned to claim",
                extra={
                    "claims": ",".join(decision.pin.claims),
                    "cpus": str(decision.pin.cpus),
                    "mems": str(decision.pin.mems),
                },
            )
