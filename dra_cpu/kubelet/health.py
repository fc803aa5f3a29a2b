"""The device-health stream (DRAResourceHealth.NodeWatchResources)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from dra_cpu.core.devices import DeviceType
from dra_cpu.driver import Driver
from dra_cpu.kubelet.gen import dra_health_v1alpha1_pb2, dra_health_v1alpha1_pb2_grpc

# The kubelet marks a device Unknown after 30 s without news: resend the full list well before that.
HEALTH_RESEND_SECONDS = 10.0


class HealthService(dra_health_v1alpha1_pb2_grpc.DRAResourceHealthServicer):
    """The complete list of every device ever published, healthy while all of its CPUs are online."""

    def __init__(self, driver: Driver, stop: threading.Event, resend_seconds: float = HEALTH_RESEND_SECONDS) -> None:
        self.driver = driver
        self.stop = stop
        self.resend_seconds = resend_seconds
        self.changed = threading.Condition()
        # Every device this driver published: a device that disappears must be reported, not forgotten.
        self.known: set[str] = {d.name for d in driver.devices}

    def notify(self) -> None:
        with self.changed:
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
        while context.is_active() and not self.stop.is_set():
            yield self.snapshot()
            with self.changed:
                self.changed.wait(self.resend_seconds)
