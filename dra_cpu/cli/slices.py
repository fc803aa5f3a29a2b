"""`dra-cpu slices`: the ResourceSlices this node would publish, without a cluster."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from dra_cpu.config import add_flags, load
from dra_cpu.core.capacity import check_settings
from dra_cpu.core.devices import build_devices, build_slices
from dra_cpu.node.sysfs import read_topology
from dra_cpu.tools.render import dump_objects


def add_parser(sub: Any) -> None:
    slices = sub.add_parser(
        "slices",
        help="print the ResourceSlices this node would publish (no cluster needed)",
        description="Takes `dra-cpu run`'s flags and --config file, so that it prints what the daemon given them "
        "would publish.",
    )
    add_flags(slices)
    slices.add_argument("--output", "-o", choices=["yaml", "json"], default="yaml")
    slices.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load(args, dict(os.environ))
    devices = config.device_config()
    topology = read_topology(Path(config.sysfs_root), pcie_roots=devices.pcie_roots)
    check_settings(topology, devices)
    slices = build_slices(build_devices(topology, devices), devices)
    print(dump_objects(slices, args.output), end="")
    return 0
