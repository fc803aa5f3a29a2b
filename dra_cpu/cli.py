"""The `dra-cpu` command: argument parsing and exit codes. Each subcommand's work lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dra_cpu import __version__
from dra_cpu.cpuset import parse_field
from dra_cpu.devices import DeviceConfig, DeviceMode, build_devices, build_slices
from dra_cpu.errors import DraCpuError
from dra_cpu.render import dump, dump_objects, topology_table
from dra_cpu.sysfs import read_topology
from dra_cpu.topology import Topology

# Exit code for bad input or environment: the message says what to fix.
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _render_topology(topo: Topology, output: str) -> str:
    return topology_table(topo) if output == "table" else dump(topo.as_dict(), output)


def cmd_discover(args: argparse.Namespace) -> int:
    root = Path(args.sysfs_root)
    print(_render_topology(read_topology(root), args.output), end="", flush=True)
    if args.watch:
        from dra_cpu.watch import watch_topology

        for topo in watch_topology(root):
            print(_render_topology(topo, args.output), end="", flush=True)
    return 0


def device_config(args: argparse.Namespace) -> DeviceConfig:
    return DeviceConfig(
        node_name=args.node_name,
        driver_name=args.driver_name,
        reserved_cpus=parse_field("--reserved-cpus", args.reserved_cpus),
        device_mode=DeviceMode(args.device_mode),
        whole_cores=args.whole_cores,
    )


def cmd_slices(args: argparse.Namespace) -> int:
    config = device_config(args)
    slices = build_slices(build_devices(read_topology(Path(args.sysfs_root)), config), config)
    print(dump_objects(slices, args.output), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from dra_cpu import logs
    from dra_cpu.config import load
    from dra_cpu.daemon import Daemon

    config = load(args, dict(os.environ))
    logs.setup(config.log_level, config.log_format)
    return Daemon(config).run()


def cmd_demo(args: argparse.Namespace) -> int:
    from dra_cpu.demo import run_demo

    return run_demo(args.cpus)


def cmd_cdi_hook(args: argparse.Namespace) -> int:
    from dra_cpu import cdihook, logs

    logs.setup("info", "json")
    return cdihook.run_hook(args)


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that shape the published devices, shared by `slices` and `run`."""
    parser.add_argument("--driver-name", default="dra.cpu", help="DRA driver name and attribute domain")
    parser.add_argument("--reserved-cpus", default="", metavar="LIST", help="CPUs kept for system daemons, e.g. 0-1")
    parser.add_argument("--device-mode", choices=[m.value for m in DeviceMode], default=DeviceMode.GROUPED.value)
    parser.add_argument(
        "--whole-cores", action="store_true", help="publish and hand out whole physical cores only (SMT siblings)"
    )


def add_sysfs_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sysfs-root",
        default="/",
        metavar="DIR",
        help="read DIR/sys and DIR/proc instead of the machine's own (default /)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dra-cpu", description="CPU/NUMA DRA driver for Kubernetes")
    parser.add_argument("--version", action="version", version=f"dra-cpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    discover = sub.add_parser("discover", help="show the CPUs, NUMA nodes and hugepages of this machine")
    add_sysfs_root(discover)
    discover.add_argument("--output", "-o", choices=["table", "json", "yaml"], default="table")
    discover.add_argument("--watch", action="store_true", help="print a fresh snapshot on every cpu/node/memory uevent")
    discover.set_defaults(handler=cmd_discover)

    slices = sub.add_parser("slices", help="print the ResourceSlices this node would publish (no cluster needed)")
    add_sysfs_root(slices)
    slices.add_argument("--node-name", required=True, help="the Kubernetes node name (pool name)")
    add_device_flags(slices)
    slices.add_argument("--output", "-o", choices=["yaml", "json"], default="yaml")
    slices.set_defaults(handler=cmd_slices)

    from dra_cpu.config import add_flags

    run = sub.add_parser("run", help="run the driver (the DaemonSet's command)")
    add_flags(run)
    run.set_defaults(handler=cmd_run)

    demo = sub.add_parser("demo", help="walk a claim through the real driver on this machine, no cluster needed")
    demo.add_argument("--cpus", type=int, default=1, help="CPUs to claim on NUMA node 0 (default 1)")
    demo.set_defaults(handler=cmd_demo)

    from dra_cpu import cdihook

    hook = sub.add_parser("cdi-hook", help="OCI createRuntime hook of --enforcement cdi-hook: pin a claimed container")
    cdihook.add_arguments(hook)
    hook.set_defaults(handler=cmd_cdi_hook)

    from dra_cpu.bench.cli import add_bench_parser
    from dra_cpu.explain import add_explain_parser
    from dra_cpu.status import add_status_parser

    add_bench_parser(sub)
    add_explain_parser(sub)
    add_status_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except DraCpuError as err:
        print(f"dra-cpu {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
