"""The NRI plugin: pins claimed containers, keeps every other container on the shared pool. The thin shell around
dra_cpu.nri.policy.

Threads: the transport's reader answers the runtime's calls inline (they only read and write the container table
under a lock, so each answer takes well under a millisecond); the updater pushes shared-pool changes with
Runtime.UpdateContainers, which must never be called from inside a runtime callback (the runtime waits for the
callback's answer while it handles the update: a deadlock in NRI before containerd/nri#301); the connector keeps a
connection up, reconnecting with backoff when the runtime restarts. `ready` is set once the runtime has synchronized
with the plugin and cleared when the connection drops.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from dra_cpu.cpuset import CPUSet
from dra_cpu.errors import DraCpuError
from dra_cpu.logs import operation
from dra_cpu.nri import policy
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.transport import FAILED_PRECONDITION, UNIMPLEMENTED, Connection, MethodError, TransportError
from dra_cpu.state import State
from dra_cpu.topology import Topology

LOG = logging.getLogger("dra_cpu.nri")

RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
EVENTS = (api.CREATE_CONTAINER, api.UPDATE_CONTAINER, api.STOP_CONTAINER, api.REMOVE_CONTAINER)
DEFAULT_SOCKET = Path("/var/run/nri/nri.sock")
UPDATE_BATCH = 25
"""Containers per UpdateContainers call: the runtime applies them one by one (~20 ms each), and a call must end
well inside the timeout."""
RETRY_SECONDS = 1.0
_INDEX = re.compile(r"^\d\d$")


def event_mask(events: tuple[int, ...] = EVENTS) -> int:
    mask = 0
    for event in events:
        mask |= 1 << (event - 1)
    return mask


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
        if not _INDEX.match(self.plugin_index):
            raise DraCpuError(f"--nri-plugin-index {self.plugin_index!r}: must be two digits, 00 to 99")
        if not self.plugin_name or any(c.isspace() or c == "/" for c in self.plugin_name):
            raise DraCpuError(f"NRI plugin name {self.plugin_name!r}: must be non-empty, without spaces or '/'")


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


def _pod_name(pod: api.PodSandbox) -> str:
    return f"{pod.namespace}/{pod.name}"


def _info(container: api.Container, pod: api.PodSandbox | None) -> policy.ContainerInfo:
    return policy.container_info(
        container.id,
        container.name,
        pod.uid if pod is not None else "",
        _pod_name(pod) if pod is not None else f"sandbox {container.pod_sandbox_id}",
        container.env,
    )


class NriPlugin:
    """The Enforcer of dra_cpu.driver: construct, `start()`, wait for `ready`, then serve; `stop()` at exit."""

    def __init__(self, config: NriConfig, topology: Topology, state: State) -> None:
        self.config = config
        self.ready = threading.Event()
        """Set while connected to the runtime and synchronized; the kubelet plugin registers only after it."""
        self._lock = threading.Lock()
        self._topology = topology
        self._pools = self._compute_pools(state, topology)
        self._containers: dict[str, _Tracked] = {}
        self._applied: dict[str, policy.Pin] = {}
        self._sync_pods: list[api.PodSandbox] = []
        self._sync_containers: list[api.Container] = []
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._down_since = time.monotonic()
        self._synchronized_once = False
        self._forged = 0
        self._update_failures = 0
        self._connects = 0
        self._threads = [
            threading.Thread(target=self._connect_loop, name="nri-connect", daemon=True),
            threading.Thread(target=self._update_loop, name="nri-update", daemon=True),
        ]

    # --- counters for the metrics module -------------------------------------------------------------------

    @property
    def forged_env_total(self) -> int:
        """Containers that carried a claim's env without being entitled to it (they got the shared pool)."""
        return self._forged

    @property
    def update_failures_total(self) -> int:
        return self._update_failures

    @property
    def connects_total(self) -> int:
        """Connections that reached synchronization (the first, then one per reconnection)."""
        return self._connects

    @property
    def shared_cpus(self) -> CPUSet:
        return self._pools.shared

    # --- Enforcer ------------------------------------------------------------------------------------------

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
        self._dirty.set()

    def set_topology(self, topology: Topology) -> None:
        with self._lock:
            self._topology = topology
            self._pools = self._compute_pools(self._pools.state, topology)
        self._dirty.set()

    def _compute_pools(self, state: State, topology: Topology) -> policy.Pools:
        return policy.pools(state, topology, self.config.reserved_cpus, self.config.strict_reserved)

    # --- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        LOG.info(
            "starting NRI plugin",
            extra={
                "socket": str(self.config.socket),
                "plugin": self.config.plugin_name,
                "index": self.config.plugin_index,
            },
        )
        for thread in self._threads:
            thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        conn = self._conn
        if conn is not None:
            conn.close()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        self.ready.clear()

    def _connect_loop(self) -> None:
        backoff = self.config.backoff_initial
        while not self._stop.is_set():
            try:
                conn = Connection.dial(str(self.config.socket), self._handle)
            except OSError as err:
                LOG.warning(
                    "cannot connect to NRI; retrying",
                    extra={"socket": str(self.config.socket), "reason": err.strerror or str(err), "retryIn": backoff},
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.backoff_max)
                continue
            self._conn = conn
            conn.start()
            if self._register(conn):
                backoff = self.config.backoff_initial
            while not conn.closed.wait(0.2):
                if self._stop.is_set():
                    conn.close()
            conn.close()
            self._disconnected()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.config.backoff_max)

    def _register(self, conn: Connection) -> bool:
        request = api.RegisterPluginRequest(plugin_name=self.config.plugin_name, plugin_idx=self.config.plugin_index)
        try:
            conn.call(RUNTIME_SERVICE, "RegisterPlugin", request.SerializeToString(), self.config.call_timeout)
        except TransportError as err:
            LOG.error("NRI registration failed", extra={"reason": str(err)})
            conn.close()
            return False
        LOG.info("registered with the runtime", extra={"plugin": self.config.plugin_name})
        return True

    def _disconnected(self) -> None:
        with self._lock:
            if self.ready.is_set():
                self._down_since = time.monotonic()
            self.ready.clear()
            self._applied.clear()
            self._sync_pods, self._sync_containers = [], []
        if not self._stop.is_set():
            LOG.warning("NRI connection lost: reconnecting", extra={"graceSeconds": self.config.grace_seconds})

    # --- the runtime's calls (on the transport's reader thread: never call the runtime from here) ----------

    def _handle(self, service: str, method: str, payload: bytes) -> bytes:
        if service != PLUGIN_SERVICE or method not in self._methods:
            LOG.warning("unknown NRI method called", extra={"service": service, "method": method})
            raise MethodError(UNIMPLEMENTED, f"{service}/{method} is not implemented by {self.config.plugin_name}")
        return self._methods[method](self, payload)

    def _configure(self, payload: bytes) -> bytes:
        request = api.ConfigureRequest.FromString(payload)
        LOG.info(
            "configured by the runtime",
            extra={
                "runtime": request.runtime_name,
                "runtimeVersion": request.runtime_version,
                "requestTimeoutMs": request.request_timeout,
            },
        )
        return api.ConfigureResponse(events=event_mask()).SerializeToString()

    def _synchronize(self, payload: bytes) -> bytes:
        request = api.SynchronizeRequest.FromString(payload)
        with self._lock:
            self._sync_pods.extend(request.pods)
            self._sync_containers.extend(request.containers)
            if request.more:
                return api.SynchronizeResponse(more=True).SerializeToString()
            pods = {p.id: p for p in self._sync_pods}
            containers, self._sync_pods, self._sync_containers = self._sync_containers, [], []
            self._containers = {}
            self._applied = {}
            updates = []
            for container in containers:
                if container.state not in (api.CONTAINER_CREATED, api.CONTAINER_RUNNING):
                    continue
                info = _info(container, pods.get(container.pod_sandbox_id))
                self._containers[info.id] = _Tracked(info)
                pin = self._decide(info, "synchronize")
                if pin is not None:
                    self._applied[info.id] = pin
                    updates.append(_update(info.id, pin))
            self._synchronized_once = True
            self._connects += 1
            self.ready.set()
        LOG.info(
            "synchronized with the runtime",
            extra={"containers": len(updates), "shared": str(self._pools.shared)},
        )
        return api.SynchronizeResponse(update=updates).SerializeToString()

    def _create_container(self, payload: bytes) -> bytes:
        request = api.CreateContainerRequest.FromString(payload)
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
        adjust = api.ContainerAdjustment(linux=api.LinuxContainerAdjustment(resources=_resources(decision.pin)))
        return api.CreateContainerResponse(adjust=adjust).SerializeToString()

    def _update_container(self, payload: bytes) -> bytes:
        request = api.UpdateContainerRequest.FromString(payload)
        info = _info(request.container, request.pod)
        with self._lock:
            self._containers.setdefault(info.id, _Tracked(info))
            pin = self._decide(info, "update")
            if pin is None:
                return api.UpdateContainerResponse().SerializeToString()
            self._applied[info.id] = pin
        return api.UpdateContainerResponse(update=[_update(info.id, pin)]).SerializeToString()

    def _stop_container(self, payload: bytes) -> bytes:
        request = api.StopContainerRequest.FromString(payload)
        with self._lock:
            tracked = self._containers.get(request.container.id)
            if tracked is not None:
                self._containers[request.container.id] = _Tracked(tracked.info, running=False)
            self._applied.pop(request.container.id, None)
        return api.StopContainerResponse().SerializeToString()

    def _state_change(self, payload: bytes) -> bytes:
        event = api.StateChangeEvent.FromString(payload)
        if event.event == api.REMOVE_CONTAINER:
            with self._lock:
                known = self._containers.pop(event.container.id, None)
                self._applied.pop(event.container.id, None)
            if known is None:
                LOG.info("removal of a container never seen", extra={"containerID": event.container.id})
        return api.Empty().SerializeToString()

    def _shutdown(self, payload: bytes) -> bytes:
        LOG.warning("the runtime asked the plugin to shut down; it will reconnect")
        return api.Empty().SerializeToString()

    _methods: ClassVar[dict[str, Callable[[NriPlugin, bytes], bytes]]] = {
        "Configure": _configure,
        "Synchronize": _synchronize,
        "CreateContainer": _create_container,
        "UpdateContainer": _update_container,
        "StopContainer": _stop_container,
        "StateChange": _state_change,
        "Shutdown": _shutdown,
    }

    def _decide(self, info: policy.ContainerInfo, why: str) -> policy.Pin | None:
        """Under the lock: the pin, or None (logged) when the shared pool is empty and nothing can be right.
        `why` names the event for the log; empty for the updater's recomputations, which would only repeat it."""
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
                self._forged += 1
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

    # --- shared pool updates (own thread) ------------------------------------------------------------------

    def _update_loop(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            if self._stop.is_set():
                return
            conn = self._conn
            if conn is None or not self.ready.is_set():
                continue  # Synchronize on (re)connection reconciles everything.
            self.push_updates(conn)

    def _pending_updates(self) -> list[api.ContainerUpdate]:
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

    def push_updates(self, conn: Connection) -> int:
        """Bring every running container to its pin, in batches; returns how many were updated. A batch that
        fails is retried after RETRY_SECONDS (its containers are marked unapplied, so they are in the retry)."""
        updates = self._pending_updates()
        done = 0
        for start in range(0, len(updates), UPDATE_BATCH):
            done += self._push_batch(conn, updates[start : start + UPDATE_BATCH])
        if done < len(updates) and not self._stop.wait(RETRY_SECONDS):
            self._dirty.set()
        return done

    def _push_batch(self, conn: Connection, updates: list[api.ContainerUpdate]) -> int:
        log = operation(LOG, "update-containers", containers=len(updates), shared=str(self._pools.shared))
        request = api.UpdateContainersRequest(update=updates)
        try:
            raw = conn.call(RUNTIME_SERVICE, "UpdateContainers", request.SerializeToString(), self.config.call_timeout)
            failed = list(api.UpdateContainersResponse.FromString(raw).failed)
        except TransportError as err:
            (log.info if self._stop.is_set() else log.error)("UpdateContainers failed", extra={"reason": str(err)})
            failed = updates
        with self._lock:
            for update in failed:
                self._applied.pop(update.container_id, None)
        if failed:
            self._update_failures += len(failed)
            log.warning(
                "runtime did not update some containers", extra={"failed": ",".join(f.container_id for f in failed)}
            )
        log.info("containers updated")
        return len(updates) - len(failed)
