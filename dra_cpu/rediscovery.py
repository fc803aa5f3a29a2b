"""Re-discovery: the node's topology is read again on cpu, node and memory uevents and every hugepagePollSeconds
(hugepage reservations send no uevent, and a pod without hostNetwork receives none at all). A changed topology
becomes the driver's new view (the pins follow), the published slices and a fresh health list; a failed read keeps
the previous topology and tells the health stream that the devices' health is unknown.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dra_cpu.core.capacity import settings_problems
from dra_cpu.core.devices import Device
from dra_cpu.core.node_view import NodeView
from dra_cpu.core.topology import Topology
from dra_cpu.driver import Snapshot
from dra_cpu.errors import DraCpuError
from dra_cpu.node.sysfs import read_topology
from dra_cpu.node.watch import topology_events

LOG = logging.getLogger("dra_cpu.daemon")


class Node(Protocol):
    """The driver, as re-discovery changes it."""

    def snapshot(self) -> Snapshot: ...

    def set_topology(self, topology: Topology) -> NodeView: ...


class Slices(Protocol):
    def set_devices(self, devices: tuple[Device, ...]) -> None: ...


class Health(Protocol):
    """The health stream (kubelet/health.HealthService), told what re-discovery found."""

    def notify(self) -> None: ...

    def discovery_ok(self) -> None: ...

    def discovery_failed(self, reason: str) -> None: ...


@dataclass
class Rediscovery:
    sysfs_root: Path
    pcie_roots: bool
    poll_seconds: float
    node: Node
    slices: Slices
    # Set once the kubelet plugin exists.
    health: Health | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            events = topology_events(timeout=self.poll_seconds)
        except OSError as err:
            LOG.warning("no uevents (%s): polling sysfs only", err.strerror)
            events = None
        while not stop.is_set():
            if events is not None:
                next(events)
            elif stop.wait(self.poll_seconds):
                return
            self.refresh()

    def refresh(self) -> None:
        health = self.health
        try:
            topology = read_topology(self.sysfs_root, pcie_roots=self.pcie_roots)
            if topology == self.node.snapshot().view.topology:
                if health is not None:
                    health.discovery_ok()
                return
            view = self.node.set_topology(topology)
        except DraCpuError as err:
            LOG.error("re-discovery failed; keeping the previous topology", extra={"reason": str(err)})
            if health is not None:
                # The devices may or may not still be there: the kubelet is told so (Unknown), not "healthy".
                health.discovery_failed(str(err))
            return
        # Reported, not fatal: the node changed under running pods, and what is left is still published.
        for problem in settings_problems(topology, view.settings.devices):
            LOG.error("the settings contradict the node as re-discovered", extra={"reason": problem})
        LOG.info("topology changed", extra={"online": str(topology.online_cpus), "devices": len(view.devices)})
        self.slices.set_devices(view.devices)
        if health is not None:
            health.notify()
            health.discovery_ok()
