"""`dra-cpu run`: the driver, as the DaemonSet runs it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dra_cpu import logs
from dra_cpu.cli.common import EXIT_USAGE
from dra_cpu.config import add_flags, load
from dra_cpu.errors import DraCpuError


def add_parser(sub: Any) -> None:
    run_parser = sub.add_parser("run", help="run the driver (the DaemonSet's command)")
    add_flags(run_parser)
    run_parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # grpc and prometheus take a good part of a second to import: only the daemon's commands pay for them, not
    # cdi-hook, which runs at every container start.
    from dra_cpu.daemon import Daemon

    config = load(args, dict(os.environ))
    logs.setup(config.log_level, config.log_format)
    daemon = Daemon(config)
    try:
        code = daemon.run()
    except DraCpuError as err:
        print(f"dra-cpu run: {err}", file=sys.stderr)
        code = EXIT_USAGE
    # The process ends here, not after the interpreter's exit (see Daemon.exit).
    daemon.exit(code)
    return code
