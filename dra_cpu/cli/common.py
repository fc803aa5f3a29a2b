"""What several commands share: the exit code for bad input and the flags that describe a node's devices."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dra_cpu.core.cpuset import parse_field
from dra_cpu.core.devices import DeviceConfig, DeviceMode, GroupBy
from dra_cpu.core.memory import DEFAULT_RESERVED_MEMORY, parse_reserved_memory

# Exit code for bad input or environment: the message says what to fix.
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def add_sysfs_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sysfs-root",
        default="/",
        metavar="DIR",
        help="read DIR/sys and DIR/proc instead of the machine's own (default /)",
    )


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the published devices, shared by `slices` and `run`."""
    parser.add_argument("--driver-name", default="dra.cpu", help="DRA driver name and attribute domain")
    parser.add_argument("--reserved-cpus", default="", metavar="LIST", help="CPUs kept for system daemons, e.g. 0-1")
    parser.add_argument(
        "--reserved-memory",
        default=DEFAULT_RESERVED_MEMORY,
        metavar="AMOUNTS",
        help="memory of each NUMA node kept from claims, e.g. 5%%, 512Mi or 1Gi,0:2Gi (default %(default)s)",
    )
    parser.add_argument("--device-mode", choices=[m.value for m in DeviceMode], default=DeviceMode.GROUPED.value)
    parser.add_argument(
        "--whole-cores", action="store_true", help="publish and hand out whole physical cores only (SMT siblings)"
    )
    parser.add_argument(
        "--group-by",
        choices=[g.value for g in GroupBy],
        default=GroupBy.NUMA_NODE.value,
        help="grouped mode: one device per NUMA node, per socket, or one for the machine",
    )
    parser.add_argument(
        "--min-shared-cpus",
        type=int,
        default=1,
        metavar="N",
        help="CPUs held back from the devices for containers without claims (default 1)",
    )
    parser.add_argument(
        "--strict-reserved",
        action="store_true",
        help="containers without claims stay off the reserved CPUs, so those do not count as shared",
    )
    parser.add_argument(
        "--publish-node-allocatable-resources",
        action="store_true",
        help="add KEP-5517 nodeAllocatableResources to every device (1.36+, gate DRANodeAllocatableResources)",
    )
    parser.add_argument(
        "--publish-pcie-roots",
        action="store_true",
        help="list the PCIe roots local to each CPU device in resource.kubernetes.io/pcieRoot "
        "(1.36+, gate DRAListTypeAttributes)",
    )


def device_config(args: argparse.Namespace) -> DeviceConfig:
    return DeviceConfig(
        node_name=args.node_name,
        driver_name=args.driver_name,
        reserved_cpus=parse_field("--reserved-cpus", args.reserved_cpus),
        device_mode=DeviceMode(args.device_mode),
        whole_cores=args.whole_cores,
        group_by=GroupBy(args.group_by),
        node_allocatable=args.publish_node_allocatable_resources,
        pcie_roots=args.publish_pcie_roots,
        min_shared_cpus=args.min_shared_cpus,
        strict_reserved=args.strict_reserved,
        reserved_memory=parse_reserved_memory(args.reserved_memory),
    )
