"""`dra-cpu explain`: why a ResourceClaim fits a node or stays Pending (dra_cpu/tools/explain does the work)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dra_cpu.cli.cluster import read_cluster
from dra_cpu.errors import DraCpuError
from dra_cpu.tools.explain.classes import chart_device_classes
from dra_cpu.tools.explain.inputs import load_objects, of_kind, pick_claim
from dra_cpu.tools.explain.parse import describe, parse_claim, parse_class, parse_slices, parse_usage
from dra_cpu.tools.explain.result import render_table
from dra_cpu.tools.explain.search import explain

# Exit code when the claim is not satisfiable; 2 (bad input) comes from the shared handler.
EXIT_UNSATISFIABLE = 1


def add_parser(sub: Any) -> None:
    explain_parser = sub.add_parser(
        "explain",
        help="why a ResourceClaim fits a node or stays Pending: selectors, capacity, constraints",
        description="Exit code 0: satisfiable; 1: not satisfiable; 2: bad input (including CEL syntax/type errors).",
    )
    explain_parser.add_argument(
        "claim_file", nargs="?", metavar="CLAIM", help="a ResourceClaim or ResourceClaimTemplate file (or --claim)"
    )
    explain_parser.add_argument("--claim", metavar="FILE", help="the same as CLAIM")
    explain_parser.add_argument("--claim-name", metavar="NAME", help="which claim, when FILE holds several")
    explain_parser.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        metavar="FILE",
        help="DeviceClass file or folder (repeatable); without it and without --kubeconfig, the DeviceClasses the "
        "dra-cpu chart installs by default",
    )
    source = explain_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--slices", metavar="FILE|DIR", help="ResourceSlices (e.g. from dra-cpu slices)")
    source.add_argument("--kubeconfig", metavar="FILE", help="read slices, classes and claims in use from the cluster")
    explain_parser.add_argument(
        "--claims-in-use", metavar="FILE|DIR", help="allocated ResourceClaims that hold devices"
    )
    explain_parser.add_argument("--output", "-o", choices=["table", "json"], default="table")
    explain_parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    given = {f for f in (args.claim_file, args.claim) if f}
    if len(given) != 1:
        raise DraCpuError(
            "give one claim file: dra-cpu explain CLAIM.yaml --slices FILE (or --claim CLAIM.yaml)"
            if not given
            else f"two claim files given ({', '.join(sorted(given))}): give one"
        )
    claim_path = Path(given.pop())
    claim_obj = pick_claim(load_objects(claim_path), str(claim_path), args.claim_name)
    claim = parse_claim(claim_obj, str(claim_path))
    class_objs: list[tuple[str, dict[str, Any]]] = []
    slice_objs: list[dict[str, Any]]
    in_use: list[dict[str, Any]] = []
    slices_source = args.slices or args.kubeconfig
    if args.kubeconfig:
        cluster = read_cluster(args.kubeconfig)
        slice_objs = cluster.slices
        class_objs = [(f"cluster {describe(o)}", o) for o in cluster.classes]
        in_use = cluster.claims
    else:
        slice_objs = of_kind(load_objects(Path(args.slices)), "ResourceSlice")
    for path in args.classes:
        class_objs += [(path, o) for o in of_kind(load_objects(Path(path)), "DeviceClass")]
    if not args.classes and not args.kubeconfig:
        defaults = chart_device_classes()
        names = ", ".join(o["metadata"]["name"] for o in defaults)
        print(
            f"explain: no --class given: assuming the DeviceClasses the dra-cpu chart installs ({names})",
            file=sys.stderr,
        )
        class_objs = [("the chart's default DeviceClasses", o) for o in defaults]
    elif not args.kubeconfig:
        # Files for another driver's classes (a GPU's, beside ours): the chart's fill in the names they lack.
        given = {(o.get("metadata") or {}).get("name") for _, o in class_objs}
        defaults = [o for o in chart_device_classes() if o["metadata"]["name"] not in given]
        if defaults:
            names = ", ".join(o["metadata"]["name"] for o in defaults)
            print(
                f"explain: assuming the dra-cpu chart's DeviceClasses the --class files lack ({names})", file=sys.stderr
            )
            class_objs += [("the chart's default DeviceClasses", o) for o in defaults]
    if args.claims_in_use:
        in_use = of_kind(load_objects(Path(args.claims_in_use)), "ResourceClaim")
    classes = {c.name: c for c in (parse_class(o, source) for source, o in class_objs)}
    devices = parse_slices(slice_objs, slices_source)
    usage = parse_usage(in_use, args.claims_in_use or str(slices_source), skip=claim.name)
    result = explain(claim, classes, devices, usage)
    if args.output == "json":
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(render_table(result), end="")
    return 0 if result.satisfiable else EXIT_UNSATISFIABLE
