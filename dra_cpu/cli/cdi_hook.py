"""`dra-cpu cdi-hook`: the OCI createRuntime hook of `--enforcement cdi-hook` (see dra_cpu/cdihook.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from dra_cpu import logs
from dra_cpu.cdihook import DEFAULT_CDI_DIR, LOG, run_hook
from dra_cpu.errors import DraCpuError
from dra_cpu.node.cgroups import CgroupError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cdi-dir", type=Path, default=DEFAULT_CDI_DIR, help="the driver's CDI spec folder")
    parser.add_argument("--driver", default="dra.cpu", help="the DRA driver name")


def add_parser(sub: Any) -> None:
    hook = sub.add_parser("cdi-hook", help="OCI createRuntime hook of --enforcement cdi-hook: pin a claimed container")
    add_arguments(hook)
    hook.set_defaults(handler=run)


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin) -> int:
    """0 when done (pinned, or nothing to pin); 1 when a claimed container could not be pinned, which makes the
    runtime fail the container rather than run it unpinned."""
    logs.setup("info", "json")
    return hook(args.cdi_dir, args.driver, stdin)


def hook(cdi_dir: Path, driver: str, stdin: TextIO) -> int:
    try:
        run_hook(cdi_dir, driver, stdin)
    except (CgroupError, DraCpuError) as err:
        LOG.error("cdi-hook failed", extra={"reason": str(err)})
        return 1
    return 0


def main(argv: Sequence[str], stdin: TextIO = sys.stdin) -> int:
    """The hook on its own argument list (tests)."""
    parser = argparse.ArgumentParser(prog="dra-cpu cdi-hook", description="OCI createRuntime hook: pin to claims")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return hook(args.cdi_dir, args.driver, stdin)
