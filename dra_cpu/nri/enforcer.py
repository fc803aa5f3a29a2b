"""dra-cpu's NRI enforcement: claimed containers are pinned to their claims, every other container stays on the
shared pool. The pins are core/entitlement.py's, from the pools the reconciler hands over (set_pools); this module
answers the runtime's calls (nri/stub.Handler) with them, keeps the container table (nri/containers.py) and hands
changed pins to the shared-pool updater (nri/updater.py); nri/messages.py makes the messages.

The pools and the container table are read and written under one lock; the runtime's callbacks only touch them (and,
when a hugepage claim's container starts, its hugetlb limit files: node/hugetlb.py), so each answer takes well under
a millisecond.

Hugepage limits: the adjustment carries them (OCI hugepageLimits); runc 1.1.10 and later write both the fault
limit and the reservation limit from it, older runc only the fault limit, and containerd drops them altogether
while its CRI `disable_hugetlb_controller` is true (its default). So once the container's cgroup exists
(StartContainer: after the OCI runtime created the container, before its process runs) the enforcer makes both
`hugetlb.<size>.max` and `hugetlb.<size>.rsvd.max` (v1: `.limit_in_bytes`, `.rsvd.limit_in_bytes`) hold the
claim's bytes itself, writing only what differs.

Memory policy: runtimes whose NRI is 0.12 or newer (ConfigureRequest.NRI_version) take a LinuxMemoryPolicy
adjustment; a claimed container gets its pin's policy there: MPOL_BIND to a strict claim's nodes, a preference for
the claim's nodes otherwise (core/memory.py). Older runtimes would ignore the field; the enforcer says so once and
relies on cpuset.mems, which binds a strict claim's nodes as well, and on the kernel's local allocation, which
prefers the nodes of the container's pinned CPUs.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dra_cpu.core import entitlement
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.errors import DraCpuError
from dra_cpu.logs import operation
from dra_cpu.node.cgroups import CgroupError
from dra_cpu.node.hugetlb import HugetlbWriter
from dra_cpu.nri import messages
from dra_cpu.nri.containers import ContainerTable
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.stub import Stub, StubConfig, events_of
from dra_cpu.nri.transport import FAILED_PRECONDITION, MethodError
from dra_cpu.nri.updater import SharedPoolUpdater

LOG = logging.getLogger("dra_cpu.nri")

DEFAULT_SOCKET = Path("/var/run/nri/nri.sock")
MEMORY_POLICY_NRI = (0, 12)
"""The first NRI version whose runtimes apply a LinuxMemoryPolicy adjustment."""
PREFERRED_MANY_KERNEL = (5, 15)
"""The first Linux that knows MPOL_PREFERRED_MANY; an older one refuses it, and with it the container."""
_VERSION = re.compile(r"^v?(\d+)\.(\d+)")


def major_minor(text: str) -> tuple[int, int] | None:
    """(major, minor) of a version such as NRI's "v0.12.1" or a kernel's "6.1.0-18-amd64"; None when there is none
    (a runtime that did not send its NRI version)."""
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
    """Containers refused because they use a claim that serves another pod (or none yet)."""
    hugetlb_unenforced: int = 0
    """Hugepage claims' containers whose cgroup hugetlb limits could not be set."""


class NriEnforcer:
    """The Enforcer of reconciler.py: construct, `start()`, wait for `ready`, then serve; `stop()` at exit."""

    def __init__(self, config: NriConfig, pools: entitlement.Pools) -> None:
        self.config = config
        self.counters = NriCounters()
        self.stub = Stub(config.stub, self)
        self.updater = SharedPoolUpdater(self.stub, self)
        self._lock = threading.Lock()
        self._pools = pools
        self.containers = ContainerTable()
        self._connected = False
        self._down_since = time.monotonic()
        self._synchronized_once = False
        self.memory_policy = False
        """Whether the connected runtime applies memory policy adjustments (NRI 0.12+)."""
        self.preferred_many = (major_minor(os.uname().release) or (0, 0)) >= PREFERRED_MANY_KERNEL
        """Whether this node's kernel (the one the runtime's containers run on) knows MPOL_PREFERRED_MANY."""
        self._said_no_memory_policy = False
        self._hugetlb = HugetlbWriter(config.cgroup_root) if config.cgroup_root is not None else None
        self.waiting: Callable[[str, str], str] | None = None
        """Told (claim uid, pod uid) of each container refused a claim that serves another pod, so that the claim
        is handed over once its pod is gone (handover.Handover.waiting); returns why that pod cannot hold the claim,
        when known. Called under the lock: it must not block."""

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
        version = major_minor(request.NRI_version)
        self.memory_policy = version is not None and version >= MEMORY_POLICY_NRI
        if not self.memory_policy and not self._said_no_memory_policy:
            self._said_no_memory_policy = True
            LOG.warning(
                "the runtime's NRI cannot set a memory policy (it needs NRI 0.12): strict claims' memory is bound "
                "by cpuset.mems only, the others' placed by the kernel's local allocation",
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
        live = [
            messages.info(c, by_id.get(c.pod_sandbox_id))
            for c in containers
            if c.state in (api.CONTAINER_CREATED, api.CONTAINER_RUNNING)
        ]
        with self._lock:
            self.containers.replace(live)
            for info in live:
                pin = self._pin(info, "synchronize")
                if pin is not None:
                    self.containers.set_applied(info.id, pin)
                    updates.append(messages.update(info.id, pin))
            self._synchronized_once = True
            self._connected = True
            self.counters.connects += 1
        LOG.info("synchronized with the runtime", extra={"containers": len(updates), "shared": str(self._pools.shared)})
        return updates

    def create_container(self, request: api.CreateContainerRequest) -> api.ContainerAdjustment:
        info = messages.info(request.container, request.pod)
        with self._lock:
            try:
                decision = entitlement.pin_for(info, self._pools, refuse_shared=True)
            except entitlement.NoSharedCpus as err:
                LOG.error("refusing container: no shared CPU left", extra={"container": info.name, "pod": info.pod})
                raise MethodError(FAILED_PRECONDITION, str(err)) from None
            except entitlement.ClaimSharedAcrossPods as err:
                self.counters.shared_claim_refused += 1
                why = self.waiting(err.claim_uid, info.pod_uid) if self.waiting is not None else ""
                message = f"{err}; this pod cannot hold it: {why}" if why else str(err)
                LOG.warning(
                    "refusing container: its claim serves another pod",
                    extra={"container": info.name, "pod": info.pod, "podUID": info.pod_uid, "reason": message},
                )
                raise MethodError(FAILED_PRECONDITION, message) from None
            self.containers.track(info)
            self.containers.set_applied(info.id, decision.pin)
            self._report(info, decision, "create")
        return messages.adjustment(decision.pin, self.memory_policy, self.preferred_many)

    def start_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        with self._lock:
            pin = self.containers.applied(container.id)
        if pin is None or not pin.hugepage_limits or self._hugetlb is None:
            return
        log = operation(LOG, "start", containerID=container.id, container=container.name, podUID=pod.uid)
        try:
            result = self._hugetlb.set_limits(container.linux.cgroups_path, pin.hugepage_limits)
        except CgroupError as err:
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
        info = messages.info(request.container, request.pod)
        with self._lock:
            self.containers.track_if_new(info)
            pin = self._pin(info, "update")
            if pin is None:
                return []
            self.containers.set_applied(info.id, pin)
        return [messages.update(info.id, pin)]

    def stop_container(self, request: api.StopContainerRequest) -> None:
        with self._lock:
            self.containers.stopped(request.container.id)

    def remove_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        with self._lock:
            known = self.containers.removed(container.id)
        if not known:
            LOG.info("removal of a container never seen", extra={"containerID": container.id, "podUID": pod.uid})

    def disconnected(self, stopping: bool) -> None:
        with self._lock:
            if self._connected:
                self._down_since = time.monotonic()
            self._connected = False
            self.containers.forget_all_applied()
        if not stopping:
            LOG.warning("NRI connection lost: reconnecting", extra={"graceSeconds": self.config.grace_seconds})

    # --- pins for the shared-pool updater (updater.Pins) ---------------------------------------------------

    def pending_updates(self) -> list[api.ContainerUpdate]:
        with self._lock:
            pending = self.containers.pending(lambda info: self._pin(info, ""))
        return [messages.update(container_id, pin) for container_id, pin in pending]

    def update_failed(self, failed: list[api.ContainerUpdate]) -> None:
        with self._lock:
            self.containers.forget_applied(u.container_id for u in failed)
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


EVENTS = events_of(NriEnforcer)
"""The container events the plugin subscribes to: those it implements."""
