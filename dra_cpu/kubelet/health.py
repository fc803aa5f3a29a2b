"""The device-health stream (DRAResourceHealth.NodeWatchResources), v1 and v1alpha1 over one core.

The two versions differ only in their proto package (the 1.37 kubelet prefers v1 and keeps v1alpha1 for 1.37 to
1.39; Kubernetes has no v1beta1 health service), so `HealthService` decides every device's health once, as data,
and `HealthServicer` turns that into the messages of one version, as kubelet/dra.py does for DRAPlugin.

A device is
- Unhealthy, with the reason, when CPUs it had went offline, when a NUMA node it covers had memory and has none
  now (memory hot-removed, MemTotal 0), or when it is no longer published (every CPU of its node offline, the
  node gone or memory-only, the hugepage pool gone);
- Unknown, with the reason, while re-discovery of the topology fails: the driver cannot tell what the node has;
- Healthy otherwise.
What a device "had" is what it covered when the driver first published it in this process.

A stream holds one of the DRA server's worker threads for as long as it is open, and the same workers answer
NodePrepareResources. So that streams can never take the workers prepares need, at most `max_streams` are served
at once, of both versions together: a new stream ends the oldest one (RESOURCE_EXHAUSTED, saying why). The kubelet
keeps one stream per plugin and abandons the old one when it reconnects, so the stream it reads is always the
newest; a client that goes away gives its worker back at once (not at the next resend).
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import grpc

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.devices import Device, DeviceType
from dra_cpu.core.topology import Topology
from dra_cpu.driver import Snapshot
from dra_cpu.kubelet.gen import dra_health_v1_pb2_grpc, dra_health_v1alpha1_pb2_grpc

LOG = logging.getLogger("dra_cpu.kubelet")

# The kubelet marks a device Unknown when no update came for its health_check_timeout_seconds (30 s by default):
# resend the full list well before that.
HEALTH_RESEND_SECONDS = 10.0
# Two resends: a single late one (a busy node, a GC pause) does not flip devices to Unknown, while a wedged driver
# shows as Unknown within 20 s rather than the kubelet's default 30 s.
HEALTH_TIMEOUT_RESENDS = 2
# The kubelet needs one; a few more cover its reconnections overlapping an old stream that is not yet closed.
MAX_HEALTH_STREAMS = 4
# The kubelet keeps at most this many bytes of a message (Go's len(): bytes, not characters) and cuts the rest.
MAX_MESSAGE_BYTES = 1024


class Health(enum.IntEnum):
    """The wire values, the same in v1 and v1alpha1."""

    UNKNOWN = 0
    HEALTHY = 1
    UNHEALTHY = 2


@dataclass(frozen=True)
class DeviceHealth:
    device: str
    health: Health
    message: str = ""


def bounded_message(message: str) -> str:
    """At most MAX_MESSAGE_BYTES of UTF-8, cut the way the kubelet would (1021 bytes and "..."), but never inside
    a character."""
    if len(message.encode()) <= MAX_MESSAGE_BYTES:
        return message
    cut = message.encode()[: MAX_MESSAGE_BYTES - 3].decode(errors="ignore")
    return cut + "..."


def device_health(
    device: Device, current: Device | None, topology: Topology, had_memory: CPUSet, held: CPUSet
) -> DeviceHealth:
    """One device's health: `device` as first published, `current` as published now (None: not any more),
    `had_memory` the NUMA nodes that had memory when first seen, `held` the device's CPUs prepared claims hold."""
    reasons = []
    if device.type is DeviceType.CPU:
        offline = device.cpus - topology.online_cpus
        if offline:
            reason = f"CPUs {offline} are offline"
            if offline & held:
                reason += f" (prepared claims hold {offline & held})"
            reasons.append(reason)
    nodes = {n.id: n for n in topology.numa_nodes}
    for node_id in device.numa_nodes:
        node = nodes.get(node_id)
        if node is None:
            reasons.append(f"NUMA node {node_id} is gone from the node")
            continue
        if node_id in had_memory and node.memory_bytes == 0:
            reasons.append(f"NUMA node {node_id} has no memory any more (MemTotal 0)")
        if device.type is DeviceType.CPU and not node.cpus & topology.online_cpus:
            reasons.append(f"NUMA node {node_id} has no online CPU any more (memory-only)")
    if current is None and not reasons:
        if device.type is DeviceType.HUGEPAGES:
            reasons.append("its hugepage pool is no longer reserved")
        else:
            reasons.append("it is no longer published: none of its CPUs is allocatable")
    if reasons:
        return DeviceHealth(device.name, Health.UNHEALTHY, bounded_message("; ".join(reasons)))
    return DeviceHealth(device.name, Health.HEALTHY)


class Snapshots(Protocol):
    """Where the node's devices, topology and claims are read, one moment at a time (driver.Driver)."""

    def snapshot(self) -> Snapshot: ...


class _Watch:
    """One open stream; its flags are read and written under HealthService.changed."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.evicted = False
        self.gone = False


class HealthService:
    """The complete list of every device ever published in this process, with its health (see the module)."""

    def __init__(
        self,
        driver: Snapshots,
        stop: threading.Event,
        resend_seconds: float = HEALTH_RESEND_SECONDS,
        max_streams: int = MAX_HEALTH_STREAMS,
    ) -> None:
        self.driver = driver
        self.stop = stop
        self.resend_seconds = resend_seconds
        self.timeout_seconds = max(1, math.ceil(HEALTH_TIMEOUT_RESENDS * resend_seconds))
        self.max_streams = max_streams
        self.changed = threading.Condition()
        # Every device this driver published, as first published: one that disappears is reported, not forgotten.
        self._first_seen: dict[str, Device] = {}
        self._had_memory = CPUSet()
        self._discovery_error = ""
        self._watches: list[_Watch] = []  # oldest first
        self._generation = 0  # counts notify(): what makes every stream send a fresh list
        now = driver.snapshot().view
        self._remember(now.devices, now.topology)

    @property
    def open_streams(self) -> int:
        with self.changed:
            return len(self._watches)

    def notify(self) -> None:
        with self.changed:
            self._generation += 1
            self.changed.notify_all()

    def discovery_failed(self, reason: str) -> None:
        """Re-discovery failed: every device is Unknown until discovery_ok()."""
        with self.changed:
            changed = reason != self._discovery_error
            self._discovery_error = reason
        if changed:
            self.notify()

    def discovery_ok(self) -> None:
        self.discovery_failed("")

    def _remember(self, devices: tuple[Device, ...], topology: Topology) -> None:
        with self.changed:
            for device in devices:
                self._first_seen.setdefault(device.name, device)
            self._had_memory |= CPUSet.of(n.id for n in topology.numa_nodes if n.memory_bytes > 0)

    def snapshot(self) -> list[DeviceHealth]:
        """Every device's health now, by name."""
        now = self.driver.snapshot()
        topology, devices = now.view.topology, now.view.devices
        self._remember(devices, topology)
        with self.changed:
            first_seen = dict(self._first_seen)
            had_memory = self._had_memory
            error = self._discovery_error
        if error:
            message = bounded_message(f"cannot tell: re-discovery of the node's topology fails: {error}")
            return [DeviceHealth(name, Health.UNKNOWN, message) for name in sorted(first_seen)]
        current = {d.name: d for d in devices}
        held: dict[str, CPUSet] = {}
        for claim in now.ledger.claims.values():
            for d in claim.devices:
                held[d.device] = held.get(d.device, CPUSet()) | d.cpus
        return [
            device_health(first_seen[name], current.get(name), topology, had_memory, held.get(name, CPUSet()))
            for name in sorted(first_seen)
        ]

    def response(self, pb2: ModuleType) -> Any:
        """The snapshot as one version's NodeWatchResourcesResponse."""
        now = int(time.time())
        pool = self.driver.snapshot().view.settings.pool
        return pb2.NodeWatchResourcesResponse(
            devices=[
                pb2.DeviceHealth(
                    device=pb2.DeviceIdentifier(pool_name=pool, device_name=h.device),
                    health=int(h.health),
                    last_updated_time=now,
                    health_check_timeout_seconds=self.timeout_seconds,
                    message=h.message,
                )
                for h in self.snapshot()
            ]
        )

    def watch(self, pb2: ModuleType, context: grpc.ServicerContext) -> Iterator[Any]:
        watch = self._open(context.peer())
        try:
            # Called when the RPC ends for any reason, the client going away included: wake the loop at once.
            if not context.add_callback(lambda: self._gone(watch)):
                self._gone(watch)
            while True:
                with self.changed:
                    if watch.evicted:
                        break
                    if watch.gone or self.stop.is_set():
                        return
                with self.changed:
                    generation = self._generation
                yield self.response(pb2)
                self._wait(watch, generation)
        finally:
            self._close(watch)
        LOG.info("health stream ended for a newer one", extra={"peer": watch.peer, "maxStreams": self.max_streams})
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"superseded by a newer health stream (at most {self.max_streams} are served at once)",
        )

    def _wait(self, watch: _Watch, generation: int) -> None:
        """Until something changed, the stream must end, or it is time to resend."""
        with self.changed:
            self.changed.wait_for(
                lambda: watch.evicted or watch.gone or self.stop.is_set() or self._generation != generation,
                self.resend_seconds,
            )

    def _open(self, peer: str) -> _Watch:
        watch = _Watch(peer)
        with self.changed:
            self._watches.append(watch)
            while len(self._watches) > self.max_streams:
                self._watches.pop(0).evicted = True
            self.changed.notify_all()
        return watch

    def _gone(self, watch: _Watch) -> None:
        with self.changed:
            watch.gone = True
            self.changed.notify_all()
        self._close(watch)

    def _close(self, watch: _Watch) -> None:
        with self.changed:
            if watch in self._watches:
                self._watches.remove(watch)


class HealthServicer(
    dra_health_v1_pb2_grpc.DRAResourceHealthServicer, dra_health_v1alpha1_pb2_grpc.DRAResourceHealthServicer
):
    """NodeWatchResources for one API version (its generated module `pb2`), over the shared core."""

    def __init__(self, core: HealthService, pb2: ModuleType) -> None:
        self.core = core
        self.pb2 = pb2

    def NodeWatchResources(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        yield from self.core.watch(self.pb2, context)
