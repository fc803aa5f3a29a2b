"""The device-health stream (DRAResourceHealth.NodeWatchResources).

A stream holds one of the DRA server's worker threads for as long as it is open, and the same workers answer
NodePrepareResources. So that streams can never take the workers prepares need, at most `max_streams` are served
at once: a new stream ends the oldest one (RESOURCE_EXHAUSTED, saying why). The kubelet keeps one stream per
plugin and abandons the old one when it reconnects, so the stream it reads is always the newest; a client that
goes away gives its worker back at once (not at the next resend).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from dra_cpu.core.devices import DeviceType
from dra_cpu.driver import Driver
from dra_cpu.kubelet.gen import dra_health_v1alpha1_pb2, dra_health_v1alpha1_pb2_grpc

LOG = logging.getLogger("dra_cpu.kubelet")

# The kubelet marks a device Unknown after 30 s without news: resend the full list well before that.
HEALTH_RESEND_SECONDS = 10.0
# The kubelet needs one; a few more cover its reconnections overlapping an old stream that is not yet closed.
MAX_HEALTH_STREAMS = 4


class _Watch:
    """One open stream; its flags are read and written under HealthService.changed."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.evicted = False
        self.gone = False


class HealthService(dra_health_v1alpha1_pb2_grpc.DRAResourceHealthServicer):
    """The complete list of every device ever published, healthy while all of its CPUs are online."""

    def __init__(
        self,
        driver: Driver,
        stop: threading.Event,
        resend_seconds: float = HEALTH_RESEND_SECONDS,
        max_streams: int = MAX_HEALTH_STREAMS,
    ) -> None:
        self.driver = driver
        self.stop = stop
        self.resend_seconds = resend_seconds
        self.max_streams = max_streams
        self.changed = threading.Condition()
        # Every device this driver published: a device that disappears must be reported, not forgotten.
        self.known: set[str] = {d.name for d in driver.devices}
        self._watches: list[_Watch] = []  # oldest first
        self._generation = 0  # counts notify(): what makes every stream send a fresh list

    @property
    def open_streams(self) -> int:
        with self.changed:
            return len(self._watches)

    def notify(self) -> None:
        with self.changed:
            self._generation += 1
            self.changed.notify_all()

    def snapshot(self) -> Any:
        pb = dra_health_v1alpha1_pb2
        topology = self.driver.topology
        current = {d.name: d for d in self.driver.devices}
        with self.changed:
            self.known.update(current)
            known = sorted(self.known)
        now = int(time.time())
        response = pb.NodeWatchResourcesResponse()
        for name in known:
            device = current.get(name)
            held = [c.cpus for c in self.driver.state.claims.values() for d in c.devices if d.device == name]
            offline = [str(cpus - topology.online_cpus) for cpus in held if not cpus.issubset(topology.online_cpus)]
            if offline:
                health, message = pb.UNHEALTHY, f"prepared CPUs {', '.join(offline)} are offline"
            elif device is None:
                health, message = pb.UNHEALTHY, "the device's CPUs or memory are gone from the node"
            elif device.type is DeviceType.CPU and not device.cpus.issubset(topology.online_cpus):
                health, message = pb.UNHEALTHY, f"CPUs {device.cpus - topology.online_cpus} are offline"
            else:
                health, message = pb.HEALTHY, ""
            response.devices.add(
                device=pb.DeviceIdentifier(pool_name=self.driver.config.node_name, device_name=name),
                health=health,
                last_updated_time=now,
                message=message,
            )
        return response

    def NodeWatchResources(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
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
                yield self.snapshot()
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
