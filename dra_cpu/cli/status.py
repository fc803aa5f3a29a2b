"""`dra-cpu status`: CPUs and hugepages per node and NUMA node, read from the cluster."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    status = sub.add_parser("status", help="CPUs and hugepages per node and NUMA node: total, allocated, by whom")
    status.add_argument("--kubeconfig", metavar="FILE", help="default: the pod's service account")
    status.add_argument("--node", metavar="NAME", help="only this node")
    status.add_argument("--driver-name", default="dra.cpu", help="DRA driver name and attribute domain")
    status.add_argument("--output", "-o", choices=["table", "json"], default="table")
    status.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Here, not at the top, as in explain.py: the daemon's command does not need them.
    from dra_cpu.cli.cluster import read_cluster
    from dra_cpu.tools.explain.parse import parse_slices, parse_usage
    from dra_cpu.tools.status import cluster_status, render_table

    cluster = read_cluster(args.kubeconfig)
    source = args.kubeconfig or "the cluster"
    rows = cluster_status(parse_slices(cluster.slices, source), parse_usage(cluster.claims, source), args.driver_name)
    if args.node:
        rows = tuple(r for r in rows if r.node == args.node)
    if args.output == "json":
        print(json.dumps({"numaNodes": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(render_table(rows), end="")
    return 0
