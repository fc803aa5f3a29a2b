"""The `dra-cpu` command: one module per subcommand (argparse and printing only); the work lives elsewhere."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dra_cpu import __version__
from dra_cpu.cli import bench, cdi_hook, demo, discover, explain, run, slices, status, support_bundle
from dra_cpu.cli.common import EXIT_USAGE, Handler
from dra_cpu.errors import DraCpuError

COMMANDS = (discover, slices, run, demo, cdi_hook, bench, explain, status, support_bundle)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dra-cpu", description="CPU/NUMA DRA driver for Kubernetes")
    parser.add_argument("--version", action="version", version=f"dra-cpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
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
