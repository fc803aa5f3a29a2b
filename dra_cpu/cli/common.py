"""What several commands share: the exit code for bad input, the handler type and the --sysfs-root flag."""

from __future__ import annotations

import argparse
from collections.abc import Callable

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
