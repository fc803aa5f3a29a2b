"""`dra-cpu status`: per node and NUMA node, the CPUs and hugepages the driver publishes, what allocated claims
hold of them (their consumedCapacity) and which claims those are. The view before placing a big NUMA-bound workload.

The core (`cluster_status`, `render_table`) is pure: ResourceSlices + ResourceClaims in, a report out. The shell
reads both from the API server.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from dra_cpu.explain import SliceDevice, Usage, held_amount, number, parse_slices, parse_usage
from dra_cpu.quantity import format_bytes


@dataclass(frozen=True)
class Amount:
    total: Fraction
    allocated: Fraction

    @property
    def free(self) -> Fraction:
        return self.total - self.allocated


@dataclass(frozen=True)
class Holding:
    claim: str
    device: str
    what: str


@dataclass(frozen=True)
class NumaStatus:
    node: str
    numa: int
    cpus: Amount
    isolated: Amount
    # Page size ("2Mi") -> bytes.
    hugepages: tuple[tuple[str, Amount], ...]
    claims: tuple[Holding, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "numaNode": self.numa,
            "cpus": _cpus(self.cpus),
            "isolatedCpus": _cpus(self.isolated),
            "hugepages": {
                size: {
                    "total": format_bytes(int(a.total)),
                    "allocated": format_bytes(int(a.allocated)),
                    "free": format_bytes(int(a.free)),
                }
                for size, a in self.hugepages
            },
            "claims": [{"claim": h.claim, "device": h.device, "holds": h.what} for h in self.claims],
        }


def _cpus(amount: Amount) -> dict[str, int]:
    return {"total": int(amount.total), "allocated": int(amount.allocated), "free": int(amount.free)}


_NONE = Amount(Fraction(0), Fraction(0))


@dataclass
class _Tally:
    cpus: Amount = _NONE
    isolated: Amount = _NONE
    hugepages: dict[str, Amount] = field(default_factory=dict)
    claims: list[Holding] = field(default_factory=list)


def _add(a: Amount, total: Fraction, allocated: Fraction) -> Amount:
    return Amount(a.total + total, a.allocated + allocated)


def _numa(device: SliceDevice) -> int:
    for key in (f"{device.driver}/numaNodeID", "resource.kubernetes.io/numaNode"):
        value = device.attributes.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return -1


def cluster_status(
    devices: Iterable[SliceDevice], usage: Mapping[tuple[str, str, str], Usage], driver: str
) -> tuple[NumaStatus, ...]:
    """One row per (node, NUMA node) of `driver`'s devices. A device with capacity counts its capacity and what
    claims consumed of it; an individual-mode CPU device (no capacity) counts 1, allocated when any claim holds it."""
    tallies: dict[tuple[str, int], _Tally] = {}
    for device in devices:
        if device.driver != driver:
            continue
        kind = device.attributes.get(f"{driver}/type")
        held = usage.get(device.key, Usage())
        tally = tallies.setdefault((device.node or device.pool, _numa(device)), _Tally())
        if kind == "cpu":
            key = f"{driver}/cpu"
            total = device.capacity[key].value if key in device.capacity else Fraction(1)
            taken = held_amount(device, held, key) if key in device.capacity else Fraction(1 if held.holders else 0)
            if device.attributes.get(f"{driver}/isolated") is True:
                tally.isolated = _add(tally.isolated, total, taken)
            else:
                tally.cpus = _add(tally.cpus, total, taken)
            unit = "CPU(s)"
        elif kind == "hugepages" and f"{driver}/memory" in device.capacity:
            key = f"{driver}/memory"
            size = str(device.attributes.get(f"{driver}/pageSize", "?"))
            total = device.capacity[key].value
            previous = tally.hugepages.get(size, _NONE)
            tally.hugepages[size] = _add(previous, total, held_amount(device, held, key))
            unit = f"of {size} hugepages"
        else:
            continue
        for claim in held.holders:
            what = number(held_amount(device, held, key, claim)) if key in device.capacity else "1"
            tally.claims.append(Holding(claim, device.name, f"{what} {unit}"))
    return tuple(
        NumaStatus(node, numa, t.cpus, t.isolated, tuple(sorted(t.hugepages.items())), tuple(t.claims))
        for (node, numa), t in sorted(tallies.items())
    )


_COLUMNS = (
    ("NODE", "<20"),
    ("NUMA", ">4"),
    ("CPUS", ">5"),
    ("ALLOC", ">5"),
    ("FREE", ">5"),
    ("ISOLATED(A/T)", ">13"),
    ("HUGEPAGES(A/T)", "<24"),
    ("CLAIMS", ""),
)


def _line(cells: Iterable[object]) -> str:
    return " ".join(f"{cell!s:{fmt}}" for cell, (_, fmt) in zip(cells, _COLUMNS, strict=True)).rstrip()


def render_table(rows: tuple[NumaStatus, ...]) -> str:
    lines = [_line(name for name, _ in _COLUMNS)]
    for row in rows:
        pages = ", ".join(
            f"{size} {format_bytes(int(a.allocated)) if a.allocated else '0'}/{format_bytes(int(a.total))}"
            for size, a in row.hugepages
        )
        cpus = _cpus(row.cpus)
        lines.append(
            _line(
                (
                    row.node,
                    row.numa,
                    cpus["total"],
                    cpus["allocated"],
                    cpus["free"],
                    f"{int(row.isolated.allocated)}/{int(row.isolated.total)}",
                    pages or "-",
                    ", ".join(f"{h.claim} ({h.what})" for h in row.claims) or "-",
                )
            )
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The shell.


@dataclass(frozen=True)
class ClusterObjects:
    slices: list[dict[str, Any]]
    classes: list[dict[str, Any]]
    claims: list[dict[str, Any]]


def read_cluster(kubeconfig: str | None) -> ClusterObjects:
    """Every ResourceSlice, DeviceClass and ResourceClaim the API server has (claims from all namespaces)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from dra_cpu.kube.api import ClusterError
    from dra_cpu.kube.apiserver import GROUP, REQUEST_TIMEOUT, VERSION, connect

    api = connect(kubeconfig)
    objects = client.CustomObjectsApi(api.api_client)

    def items(plural: str) -> list[dict[str, Any]]:
        try:
            listed = objects.list_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            raise ClusterError(f"listing {plural} at {api.server}: {err.status} {err.reason}") from None
        except OSError as err:
            raise ClusterError(f"listing {plural}: cannot reach the API server at {api.server}: {err}") from None
        kind = {"resourceslices": "ResourceSlice", "deviceclasses": "DeviceClass", "resourceclaims": "ResourceClaim"}
        # List items carry no kind of their own; the explanation names objects by it.
        found = listed.get("items", []) if isinstance(listed, dict) else []
        return [{"kind": kind[plural], **item} for item in found]

    try:
        return ClusterObjects(items("resourceslices"), items("deviceclasses"), items("resourceclaims"))
    finally:
        api.api_client.close()  # type: ignore[no-untyped-call]


def add_status_parser(subparsers: Any) -> None:
    status = subparsers.add_parser(
        "status", help="CPUs and hugepages per node and NUMA node: total, allocated, by whom"
    )
    status.add_argument("--kubeconfig", metavar="FILE", help="default: the pod's service account")
    status.add_argument("--node", metavar="NAME", help="only this node")
    status.add_argument("--driver-name", default="dra.cpu", help="DRA driver name and attribute domain")
    status.add_argument("--output", "-o", choices=["table", "json"], default="table")
    status.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
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
