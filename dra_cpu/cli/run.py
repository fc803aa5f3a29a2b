"""`dra-cpu run`: the driver, as the DaemonSet runs it."""

from __future__ import annotations

import argparse
import os
from typing import Any

from dra_cpu import logs
from dra_cpu.config import add_flags, load


def add_parser(sub: Any) -> None:
    run_parser = sub.add_parser("run", help="run the driver (the DaemonSet's command)")
    add_flags(run_parser)
    run_parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # grpc, kubernetes and prometheus take about a second to import: only the daemon's commands pay for them, not
    # cdi-hook, which runs at every container start.
    from dra_cpu.daemon import Daemon

    config = load(args, dict(os.environ))
    logs.setup(config.log_level, config.log_format)
    return Daemon(config).run()
