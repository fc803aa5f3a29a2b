"""`dra-cpu bench numa` and `dra-cpu bench isolation`: arguments, progress on stderr, results on stdout and files.

The measuring modules are imported inside the handlers, so `dra-cpu` starts (and `--help` works) without numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dra_cpu.bench.report import isolation_report_dict, isolation_table, numa_report_dict, numa_table
from dra_cpu.cli.common import add_sysfs_root
from dra_cpu.core.cpuset import parse_field
from dra_cpu.errors import DraCpuError

QUICK_ITERATIONS = 2
QUICK_LATENCY_STEPS = 100_000
QUICK_SECONDS = 2.0


# Each benchmark's help line and description.
COMMANDS = {
    "numa": (
        "bandwidth and latency for every (CPU node, memory node) pair allowed to this process",
        "Copy/triad bandwidth (numpy, one thread per CPU of the node) and pointer-chase latency for every allowed "
        "(CPU node, memory node) pair, with memory bound by mbind and placement checked in /proc/self/numa_maps.",
    ),
    "isolation": (
        "a latency probe alone, beside a noisy neighbour, and on CPUs exclusive to it",
        "Timed wake-ups and a fixed compute kernel measured alone, sharing CPUs with a CPU+memory hog, and on "
        "exclusive CPUs while the hog runs on the rest. As root on a node the CPUs are split with cgroup cpusets; "
        "otherwise (in a pod) with sched_setaffinity over the CPUs the claims gave.",
    ),
}


def add_parser(subparsers: Any) -> None:
    """Register `bench numa` and `bench isolation` on the top-level subparsers; each sets args.handler."""
    bench = subparsers.add_parser("bench", help="measure what NUMA alignment and exclusive CPUs buy on this node")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")

    numa = _subcommand(sub, "numa")
    numa.add_argument("--size", metavar="SIZE", help="bytes per array, e.g. 1G (default: 4x the L3, at least 256M)")
    numa.add_argument("--iterations", type=int, help="runs per figure; the best bandwidth is kept (default 5)")
    numa.add_argument("--latency-steps", type=int, help="dependent loads per latency run (default 1000000)")
    numa.add_argument("--hugepages", action="store_true", help="use 2 MiB hugepages (from the memory node's pool)")
    add_sysfs_root(numa)
    _common(numa)
    numa.set_defaults(handler=cmd_bench_numa)

    isolation = _subcommand(sub, "isolation")
    isolation.add_argument("--probe-cpus", metavar="LIST", help="CPUs for the probe (default: the last allowed CPU)")
    isolation.add_argument("--seconds", type=float, help="seconds per case (default 10)")
    isolation.add_argument("--interval-us", type=int, default=1000, help="wake-up period in us (default 1000)")
    isolation.add_argument(
        "--enforce",
        choices=["auto", "cgroup", "affinity"],
        default="auto",
        help="how the CPUs are split: cgroup cpusets, sched_setaffinity, or cgroups where possible (default)",
    )
    _common(isolation)
    isolation.set_defaults(handler=cmd_bench_isolation)


def _subcommand(sub: Any, name: str) -> argparse.ArgumentParser:
    help_text, description = COMMANDS[name]
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=description)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a short, smaller run (a smoke test, not figures)")
    parser.add_argument("--output", "-o", choices=["table", "json"], default="table")
    parser.add_argument("--output-dir", metavar="DIR", help="also write the JSON report and PNG plots into DIR")


def _at_least(value: float, minimum: float, field: str) -> None:
    if value < minimum:
        raise DraCpuError(f"{field} {value:g}: must be at least {minimum:g}")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_bench_numa(args: argparse.Namespace) -> int:
    # numpy is an optional extra: the measuring modules are imported only when a benchmark runs.
    from dra_cpu.bench.numa import NumaOptions, parse_size, run_numa_bench

    iterations = args.iterations if args.iterations is not None else QUICK_ITERATIONS if args.quick else 5
    steps = args.latency_steps if args.latency_steps is not None else QUICK_LATENCY_STEPS if args.quick else 1_000_000
    _at_least(iterations, 1, "--iterations")
    _at_least(steps, 1000, "--latency-steps")
    size = parse_size(args.size) if args.size is not None else None
    options = NumaOptions(size, iterations, steps, args.hugepages, args.quick, Path(args.sysfs_root))
    report = run_numa_bench(options, _progress)
    data = numa_report_dict(report)
    _emit(args.output, data, numa_table(report))
    if args.output_dir:
        # matplotlib is an optional extra, needed only for plots.
        from dra_cpu.bench.plot import numa_heatmaps

        _write_outputs(Path(args.output_dir), "numa.json", data, lambda d: numa_heatmaps(report, d))
    return 0


def cmd_bench_isolation(args: argparse.Namespace) -> int:
    # As above: only when this benchmark runs.
    from dra_cpu.bench.isolation import IsolationOptions, run_isolation_bench

    seconds = args.seconds if args.seconds is not None else QUICK_SECONDS if args.quick else 10.0
    _at_least(seconds, 0.1, "--seconds")
    _at_least(args.interval_us, 100, "--interval-us")
    probe = parse_field("--probe-cpus", args.probe_cpus) if args.probe_cpus is not None else None
    report = run_isolation_bench(IsolationOptions(probe, seconds, args.interval_us, args.enforce), _progress)
    data = isolation_report_dict(report)
    _emit(args.output, data, isolation_table(report))
    if args.output_dir:
        # matplotlib is an optional extra, needed only for plots.
        from dra_cpu.bench.plot import isolation_cdfs

        _write_outputs(Path(args.output_dir), "isolation.json", data, lambda d: isolation_cdfs(report, d))
    return 0


def _emit(output: str, data: dict[str, Any], table: str) -> None:
    print(json.dumps(data, indent=2) if output == "json" else table, end="\n" if output == "json" else "")


def _write_outputs(directory: Path, name: str, data: dict[str, Any], plot: Callable[[Path], list[Path]]) -> None:
    """The JSON first, so a missing matplotlib still leaves the figures for scripts."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(json.dumps(data, indent=2) + "\n")
    except OSError as err:
        raise DraCpuError(f"--output-dir {directory}: {err.strerror}") from None
    _progress(f"wrote {directory / name}")
    for path in plot(directory):
        _progress(f"wrote {path}")
