"""`dra-cpu demo`: a claim walked through the real driver on this machine, no cluster needed."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="walk a claim through the real driver on this machine, no cluster needed")
    demo.add_argument("--cpus", type=int, default=1, help="CPUs to claim on NUMA node 0 (default 1)")
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # The demo runs the daemon: grpc takes a good part of a second to import, which other commands skip.
    from dra_cpu.tools.demo import run_demo

    return run_demo(args.cpus)
