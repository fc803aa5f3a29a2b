"""Re-discovery on change: pyudev uevents for cpu, node and memory devices trigger a fresh read of sysfs."""

from __future__ import annotations

import select
from collections.abc import Iterator
from pathlib import Path

import pyudev

from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology

SUBSYSTEMS = ("cpu", "node", "memory")
# Offlining a core or onlining memory sends a burst of uevents; one snapshot per burst is enough.
DEBOUNCE_SECONDS = 0.2


def topology_events(timeout: float | None = None) -> Iterator[bool]:
    """Yields True after each burst of relevant uevents, False when `timeout` passes with none."""
    context = pyudev.Context()
    # Raw kernel uevents, not udev's re-broadcast: nodes and pods often run no udevd. The kernel sends them only to
    # the host's network namespace, so a pod needs hostNetwork for events (the daemon also re-reads periodically).
    monitor = pyudev.Monitor.from_netlink(context, source="kernel")
    for subsystem in SUBSYSTEMS:
        monitor.filter_by(subsystem)
    monitor.start()
    while True:
        ready, _, _ = select.select([monitor], [], [], timeout)
        if not ready:
            yield False
            continue
        while monitor.poll(timeout=DEBOUNCE_SECONDS) is not None:
            pass
        yield True


def watch_topology(root: Path, timeout: float | None = None, *, pcie_roots: bool = False) -> Iterator[Topology]:
    """A fresh Topology after every change; yields nothing while nothing changes."""
    previous = read_topology(root, pcie_roots=pcie_roots)
    for changed in topology_events(timeout):
        if not changed:
            continue
        current = read_topology(root, pcie_roots=pcie_roots)
        if current != previous:
            previous = current
            yield current
