"""`dra-cpu support-bundle`: the driver's view of this node in one archive (dra_cpu/tools/support_bundle.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from dra_cpu.config import Config, ConfigError, add_flags, load
from dra_cpu.errors import DraCpuError
from dra_cpu.tools.support_bundle import collect


def add_parser(sub: Any) -> None:
    bundle = sub.add_parser(
        "support-bundle",
        help="the driver's view of this node (topology, devices, checkpoint, CDI specs, NRI, metrics, versions) "
        "in one archive, for a bug report",
        description="Run where the daemon runs, with its flags or --config: kubectl -n kube-system exec "
        "ds/dra-cpu -- dra-cpu support-bundle --config /etc/dra-cpu/config.yaml -o - > bundle.tar.gz",
    )
    bundle.add_argument(
        "--output", "-o", default="-", metavar="FILE", help="where to write the .tar.gz (default -: standard output)"
    )
    add_flags(bundle)
    bundle.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    try:
        config, error = load(args, environ), ""
    except ConfigError as err:
        # The bundle is for when things are wrong: the defaults stand in, and the manifest says why.
        config, error = Config(node_name=args.node_name or environ.get("NODE_NAME", "")), str(err)
    text = ""
    if args.config:
        try:
            text = Path(args.config).read_text(errors="replace")
        except OSError as err:
            text = f"(cannot read {args.config}: {err.strerror})"
    if args.output == "-" and sys.stdout.isatty():
        raise DraCpuError("the archive is binary: give --output FILE, or redirect standard output to a file")
    archive = collect(config, error, text)
    if args.output == "-":
        sys.stdout.buffer.write(archive)
        sys.stdout.buffer.flush()
    else:
        try:
            Path(args.output).write_bytes(archive)
        except OSError as err:
            raise DraCpuError(f"--output {args.output}: {err.strerror}") from None
        print(f"wrote {args.output} ({len(archive)} bytes)", file=sys.stderr)
    return 0
