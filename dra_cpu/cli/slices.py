"""`dra-cpu slices`: the ResourceSlices this node would publish, without a cluster."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dra_cpu.cli.common import add_device_flags, add_sysfs_root, device_config
from dra_cpu.core.capacity import check_settings
from dra_cpu.core.devices import build_devices, build_slices
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.render import dump_objects


def add_parser(sub: Any) -> None:
    slices = sub.add_parser("slices", help="print the ResourceSlices this node would publish (no cluster needed)")
    add_sysfs_root(slices)
    slices.add_argument("--node-name", required=True, help="the Kubernetes node name (pool name)")
    add_device_flags(slices)
    slices.add_argument("--output", "-o", choices=["yaml", "json"], default="yaml")
    slices.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = device_config(args)
    topology = read_topology(Path(args.sysfs_root), pcie_roots=config.pcie_roots)
    check_settings(topology, config)
    slices = build_slices(build_devices(topology, config), config)
    print(dump_objects(slices, args.output), end="")
    return 0
