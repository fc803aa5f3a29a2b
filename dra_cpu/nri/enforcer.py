"""dra-cpu's NRI enforcement: claimed containers are pinned to their claims, every other container stays on the
shared pool. The decisions are core/entitlement.py's; this module keeps the runtime's container table, answers
the runtime through the NRI stub and hands changed pins to the shared-pool updater.

The container table is read and written under one lock; the runtime's callbacks only touch the table (and, when
a hugepage claim's container starts, its hugetlb limit files), so each answer takes well under a millisecond.

Hugepage limits: the adjustment carries them (OCI hugepageLimits); runc 1.1.10 and later write both the fault
limit and the reservation limit from it, older runc only the fault limit, and containerd drops them altogether
while its CRI `disable_hugetlb_controller` is true (its default). So once the container's cgroup exists
(StartContainer: after the OCI runtime created the container, before its process runs) the enforcer makes both
`hugetlb.<size>.max` and `hugetlb.<size>.rsvd.max` (v1: `.limit_in_bytes`, `.rsvd.limit_in_bytes`) hold the
claim's bytes itself, writing only what differs.

Memory policy: runtimes whose NRI is 0.12 or newer (ConfigureRequest.NRI_version) take a LinuxMemoryPolicy
adjustment; a claimed container gets MPOL_BIND to its claim's NUMA nodes there. Older runtimes would ignore the
field; the enforcer says so once and relies on cpuset.mems, which binds the same nodes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dra_cpu.core import entitlement
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.errors import DraCpuError
from dra_cpu.logs import operation
from dra_cpu.node import cgroups
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.stub import Stub, StubConfig
from dra_cpu.nri.transport import FAILED_PRECONDITION, MethodError
from dra_cpu.nri.updater import SharedPoolUpdater

LOG = logging.getLogger("dra_cpu.nri")

EVENTS = (
    api.CREATE_CONTAINER,
    api.START_CONTAINER,
    api.UPDATE_CONTAINER,
    api.STOP_CONTAINER,
    api.REMOVE_CONTAINER,
)
DEFAULT_SOCKET = Path("/var/run/nri/nri.sock")
MEMORY_POLICY_NRI = (0, 12)
"""The first NRI version whose runtimes apply a LinuxMemoryPolicy adjustment."""
MEMORY_POLICY_MODE = api.MPOL_BIND
_VERSION = re.compile(r"^v?(\d+)\.(\d+)")


def nri_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of an NRI version such as "v0.12.1"; None when the runtime did not send one."""
    match = _VERSION.match(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass(frozen=True)
class NriConfig:
    socket: Path = DEFAULT_SOCKET
    plugin_name: str = "dra-cpu"
    plugin_index: str = "00"
    grace_seconds: float = 10.0
    """How long enforcement may be down (the runtime restarting) before prepares fail."""
    call_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    cgroup_root: Path | None = Path("/sys/fs/cgroup")
    """Where the host's cgroup hierarchies are, for hugetlb reservation limits; None: leave them to the runtime."""

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
    shared_claim_refused: int = 0
    """Containers refused because they use a claim prepared for another pod."""
    hugetlb_unenforced: int = 0
    """Hugepage claims' containers whose cgroup hugetlb limits could not be set."""


@dataclass(frozen=True)
class _Tracked:
    info: entitlement.ContainerInfo
    running: bool = True


def _adjustment(pin: entitlement.Pin, memory_policy: bool) -> api.ContainerAdjustment:
    linux = api.LinuxContainerAdjustment(resources=_resources(pin))
    if memory_policy and pin.claims and pin.mems:
        linux.memory_policy.CopyFrom(api.LinuxMemoryPolicy(mode=MEMORY_POLICY_MODE, nodes=str(pin.mems)))
    return api.ContainerAdjustment(linux=linux)


def _resources(pin: entitlement.Pin) -> api.LinuxResources:
    resources = api.LinuxResources(cpu=api.LinuxCPU(cpus=str(pin.cpus), mems=str(pin.mems) if pin.mems else ""))
    resources.hugepage_limits.extend(api.HugepageLimit(page_size=s, limit=b) for s, b in pin.hugepage_limits)
    return resources


def _update(container_id: str, pin: entitlement.Pin) -> api.ContainerUpdate:
    # A container may exit between our decision and the runtime's update: that must not fail the others.
    return api.ContainerUpdate(
        container_id=container_id, linux=api.LinuxContainerUpdate(resources=_resources(pin)), ignore_failure=True
    )


def _info(container: api.Container, pod: api.PodSandbox | None) -> entitlement.ContainerInfo:
    return entitlement.container_info(
        container.id,
        container.name,
        pod.uid if pod is not None else "",
        f"{pod.namespace}/{pod.name}" if pod is not None else f"sandbox {container.pod_sandbox_id}",
        container.env,
    )


class NriEnforcer:
    """The Enforcer of dra_cpu.driver: construct, `start()`, wait for `ready`, then serve; `stop()` at exit."""

    events = EVENTS

    def __init__(self, config: NriConfig, pools: entitlement.Pools) -> None:
        self.config = config
        self.counters = NriCounters()
        self.stub = Stub(config.stub, self)
        self.updater = SharedPoolUpdater(self.stub, self)
        self._lock = threading.Lock()
        self._pools = pools
        self._containers: dict[str, _Tracked] = {}
        self._applied: dict[str, entitlement.Pin] = {}
        self._connected = False
        self._down_since = time.monotonic()
        self._synchronized_once = False
        self.memory_policy = False
        """Whether the connected runtime applies memory policy adjustments (NRI 0.12+)."""
        self._said_no_memory_policy = False
        self._hugetlb: cgroups.HugetlbHierarchy | None = None

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

    # --- Enforcer (reconciler.py) ------------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.ready.is_set():
            return
        down = time.monotonic() - self._down_since
        if not self._synchronized_once or down > self.config.grace_seconds:
            raise DraCpuError(
                f"CPU pinning is not enforced: no NRI connection to the container runtime at {self.config.socket} "
                f"for {down:.0f}s; retry later (is NRI enabled in the runtime?)"
            )

    def set_pools(self, pools: entitlement.Pools) -> None:
        with self._lock:
            self._pools = pools
        self.updater.poke()

    # --- the runtime's calls (stub.Handler; on the transport's reader thread) ------------------------------

    def configured(self, request: api.ConfigureRequest) -> None:
        version = nri_version(request.NRI_version)
        self.memory_policy = version is not None and version >= MEMORY_POLICY_NRI
        if not self.memory_policy and not self._said_no_memory_policy:
            self._said_no_memory_policy = True
            LOG.warning(
                "the runtime's NRI cannot set a memory policy (it needs NRI 0.12): claimed containers' memory is "
                "bound by cpuset.mems only",
                extra={
                    "runtime": request.runtime_name,
                    "runtimeVersion": request.runtime_version,
                    "nriVersion": request.NRI_version or "unknown (older than 0.12)",
                },
            )

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
                pin = self._pin(info, "synchronize")
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
                decision = entitlement.pin_for(info, self._pools, refuse_shared=True)
            except entitlement.NoSharedCpus as err:
                LOG.error("refusing container: no shared CPU left", extra={"container": info.name, "pod": info.pod})
                raise MethodError(FAILED_PRECONDITION, str(err)) from None
            except entitlement.ClaimSharedAcrossPods as err:
                self.counters.shared_claim_refused += 1
                LOG.error(
                    "refusing container: it uses a claim prepared for another pod",
                    extra={"container": info.name, "pod": info.pod, "podUID": info.pod_uid, "reason": str(err)},
                )
                raise MethodError(FAILED_PRECONDITION, str(err)) from None
            self._containers[info.id] = _Tracked(info)
            self._applied[info.id] = decision.pin
            self._report(info, decision, "create")
        return _adjustment(decision.pin, self.memory_policy)

    def start_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        with self._lock:
            pin = self._applied.get(container.id)
        if pin is None or not pin.hugepage_limits or self.config.cgroup_root is None:
            return
        log = operation(LOG, "start", containerID=container.id, container=container.name, podUID=pod.uid)
        try:
            if self._hugetlb is None:
                self._hugetlb = cgroups.find_hugetlb_hierarchy(self.config.cgroup_root)
            if self._hugetlb is None:
                raise cgroups.CgroupError(f"no hugetlb controller under {self.config.cgroup_root}")
            cgroup = cgroups.container_cgroup(container.linux.cgroups_path)
            result = cgroups.set_hugetlb_limits(self._hugetlb, cgroup, pin.hugepage_limits)
        except cgroups.CgroupError as err:
            with self._lock:
                self.counters.hugetlb_unenforced += 1
            log.warning(
                "hugepage limits not set in the container's cgroup (the pod's own hugetlb limit still applies)",
                extra={"reason": str(err)},
            )
            return
        if result.no_reservation_limit:
            log.warning(
                "the kernel has no hugetlb reservation limit: only page faults are limited",
                extra={"pageSizes": ",".join(result.no_reservation_limit)},
            )
        log.info(
            "hugepage limits set",
            extra={"limits": ",".join(f"{s}={b}" for s, b in pin.hugepage_limits), "written": ",".join(result.written)},
        )

    def update_container(self, request: api.UpdateContainerRequest) -> list[api.ContainerUpdate]:
        info = _info(request.container, request.pod)
        with self._lock:
            self._containers.setdefault(info.id, _Tracked(info))
            pin = self._pin(info, "update")
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

    def remove_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        with self._lock:
            known = self._containers.pop(container.id, None)
            self._applied.pop(container.id, None)
        if known is None:
            LOG.info("removal of a container never seen", extra={"containerID": container.id, "podUID": pod.uid})

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
                pin = self._pin(tracked.info, "")
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

    def _pin(self, info: entitlement.ContainerInfo, why: str) -> entitlement.Pin | None:
        """The pin, or None (logged) when the shared pool is empty and nothing can be right. `why` names the
        event for the log; empty for the updater's recomputations, which would only repeat it."""
        try:
            decision = entitlement.pin_for(info, self._pools)
        except entitlement.NoSharedCpus as err:
            LOG.error("container left as it is", extra={"container": info.name, "pod": info.pod, "reason": str(err)})
            return None
        if why:
            self._report(info, decision, why)
        return decision.pin

    def _report(self, info: entitlement.ContainerInfo, decision: entitlement.Decision, why: str) -> None:
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
