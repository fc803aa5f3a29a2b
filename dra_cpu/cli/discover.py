"""`dra-cpu discover`: the CPUs, NUMA nodes and hugepages of this machine, once or on every change."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dra_cpu.cli.common import add_sysfs_root
from dra_cpu.core.topology import Topology
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.render import dump, topology_table


def add_parser(sub: Any) -> None:
    discover = sub.add_parser("discover", help="show the CPUs, NUMA nodes, hugepages and PCIe roots of this machine")
    add_sysfs_root(discover)
    discover.add_argument("--output", "-o", choices=["table", "json", "yaml"], default="table")
    discover.add_argument("--watch", action="store_true", help="print a fresh snapshot on every cpu/node/memory uevent")
    discover.set_defaults(handler=run)


def _render(topo: Topology, output: str) -> str:
    return topology_table(topo) if output == "table" else dump(topo.as_dict(), output)


def run(args: argparse.Namespace) -> int:
    root = Path(args.sysfs_root)
    # The PCIe roots too: what the driver publishes with publishPcieRoots.
    print(_render(read_topology(root, pcie_roots=True), args.output), end="", flush=True)
    if args.watch:
        # pyudev loads libudev: only --watch needs it, not every command that imports this module.
        from dra_cpu.node.watch import watch_topology

        for topo in watch_topology(root, pcie_roots=True):
            print(_render(topo, args.output), end="", flush=True)
    return 0
