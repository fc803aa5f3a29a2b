"""The node never promises what it then refuses: for random machines, settings and claim histories, every allocation
the published ResourceSlices allow is granted by grant(), nothing they forbid is, and `dra-cpu status`, `dra-cpu
explain` and the daemon's metrics count the same free CPUs.

The scheduler is modelled as `dra-cpu explain` models the 1.37 allocator on consumable capacity (tools/explain):
the slices are the published ones, read back as the API server stores them, and the claims in use are allocated
ResourceClaims whose consumedCapacity says what each holds. A claim's own placement demands (CPUConfig: wholeCores,
alignL3, distributeAcrossNUMA) are invisible to the scheduler and are left out: those are checked at prepare.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

from hypothesis import given, reject
from hypothesis import strategies as st

from dra_cpu.core.allocator import AllocationPolicy
from dra_cpu.core.capacity import settings_problems
from dra_cpu.core.claims import ClaimError, ClaimRef, allocated_claim_object, allocation_result, parse_claim
from dra_cpu.core.devices import Device, DeviceConfig, allocatable_cpus, build_slices
from dra_cpu.core.grant import grant
from dra_cpu.core.ledger import Ledger, PreparedClaim
from dra_cpu.core.node_view import NodeSettings, NodeView
from dra_cpu.core.topology import Topology
from dra_cpu.tools.explain.model import Alternative, DeviceClass, SliceDevice, Usage, held_amount
from dra_cpu.tools.explain.parse import parse_slices, parse_usage
from dra_cpu.tools.explain.search import check_device
from dra_cpu.tools.status import cluster_status
from tests.core.test_properties import bounded
from tests.harness.strategies import DRIVER, POOL, device_configs, topologies

ANY = DeviceClass("any", ())
# One result of a claim: (index into the published devices, the amount its request asks: CPUs, or pages).
Ask = tuple[int, int]


@st.composite
def machines(draw: st.DrawFn) -> tuple[Topology, DeviceConfig]:
    topology = draw(topologies())
    online = topology.online_cpus.sorted()
    isolated = draw(st.sets(st.sampled_from(online), max_size=len(online) // 2))
    cpus = tuple(dataclasses.replace(c, isolated=c.id in isolated) for c in topology.cpus)
    topology = dataclasses.replace(topology, cpus=cpus)
    config = draw(device_configs(topology))
    if settings_problems(topology, config):
        reject()
    return topology, config


histories = st.lists(
    st.one_of(
        st.tuples(
            st.just("prepare"), st.lists(st.tuples(st.integers(0, 63), st.integers(1, 12)), min_size=1, max_size=3)
        ),
        st.tuples(st.just("unprepare"), st.integers(0, 63)),
    ),
    min_size=1,
    max_size=12,
)


class Node:
    """The published slices as the scheduler reads them, the claims it allocated, and the driver's state."""

    def __init__(self, topology: Topology, config: DeviceConfig) -> None:
        self.topology, self.config = topology, config
        self.view = NodeView.of(topology, NodeSettings(config))
        self.devices = self.view.devices
        self.index = self.view.device_index
        self.published = parse_slices(build_slices(self.devices, config), "published")
        self.state = Ledger()
        self.allocated: dict[str, dict[str, Any]] = {}
        self.serial = 0

    def usage(self) -> dict[tuple[str, str, str], Usage]:
        return parse_usage(list(self.allocated.values()), "allocated")

    def schedule(self, asks: list[Ask]) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]], bool]:
        """What the scheduler records for `asks` (results with the consumedCapacity it rounds them up to), None when
        the slices do not allow it; beside it the results as asked, unrounded, and whether the slices allow those
        as they stand (every amount one the requestPolicy allows, all of them free)."""
        usage, taken = self.usage(), dict[tuple[str, str], Fraction]()
        results: list[dict[str, Any]] = []
        raw: list[dict[str, Any]] = []
        fits = exact = True
        for i, (which, amount) in enumerate(asks):
            device = self.published[which % len(self.published)]
            key = next(iter(device.capacity), None)
            # Hugepages are asked in half pages, so that some asks are not whole pages.
            asked = Fraction(amount * (self.index[device.name].step // 2 if key == self.config.memory_capacity else 1))
            alt = Alternative(f"r{i}", ANY.name, (), False, 1, ((key, asked),) if key else ())
            check = check_device(alt, ANY, device, usage.get(device.key, Usage()), device.name)
            fits &= check.fits and (device.allow_multiple or device.name not in {r["device"] for r in results})
            for k, v in check.takes:
                taken[(device.name, k)] = taken.get((device.name, k), Fraction(0)) + v
                fits &= taken[(device.name, k)] + _held(device, usage, k) <= device.capacity[k].value
                exact &= v == asked and device.capacity[k].rounded(asked) == asked
            results.append(
                allocation_result(DRIVER, POOL, device.name, request=f"r{i}", consumed=_amounts(check.takes))
            )
            raw.append(
                allocation_result(
                    DRIVER, POOL, device.name, request=f"r{i}", consumed=_amounts(((key, asked),) if key else ())
                )
            )
        return (results if fits else None), raw, fits and exact

    def claim(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        self.serial += 1
        uid = f"00000000-0000-4000-8000-{self.serial:012d}"
        return allocated_claim_object(
            "default", f"c{self.serial}", results, uid=uid, pod_uids=[f"pod-{uid}"], node=POOL
        )

    def prepare(self, obj: dict[str, Any]) -> PreparedClaim:
        meta = obj["metadata"]
        ref = ClaimRef(meta["namespace"], meta["name"], meta["uid"])
        request = parse_claim(obj, ref, driver=DRIVER, pool=POOL, default_policy=AllocationPolicy())
        return grant(self.state, request, self.view)


def _held(device: SliceDevice, usage: dict[tuple[str, str, str], Usage], key: str) -> Fraction:
    return held_amount(device, usage.get(device.key, Usage()), key)


def _amounts(takes: Iterable[tuple[str | None, Fraction]]) -> dict[str, str]:
    return {str(k): str(v) for k, v in takes if k is not None}


def _refused(node: Node, obj: dict[str, Any]) -> bool:
    try:
        node.prepare(obj)
    except ClaimError:
        return True
    return False


@bounded(1500)
@given(machines(), histories)
def test_what_the_slices_allow_prepare_grants_and_nothing_else(
    machine: tuple[Topology, DeviceConfig], history: list[tuple[str, Any]]
) -> None:
    node = Node(*machine)
    if not node.published:
        return
    for op, arg in history:
        if op == "unprepare":
            if node.allocated:
                uid = sorted(node.allocated)[arg % len(node.allocated)]
                del node.allocated[uid]
                node.state = node.state.without(uid)
            continue
        results, raw, exact = node.schedule(arg)
        # As asked: granted exactly when the slices allow these very amounts (no rounding needed, all free).
        if not exact:
            assert _refused(node, node.claim(raw)), f"the slices forbid {raw}, prepare grants it"
        if results is not None:
            obj = node.claim(results)
            try:
                claim = node.prepare(obj)
            except ClaimError as err:
                raise AssertionError(f"the slices allow {results}, prepare refuses it: {err}") from None
            node.state = node.state.with_claim(claim)
            node.allocated[claim.uid] = obj
        _counts_agree(node)


def _counts_agree(node: Node) -> None:
    """`dra-cpu status`'s free CPUs, explain's and the daemon's are one number, and it is what prepare grants."""
    usage = node.usage()
    rows = cluster_status(node.published, usage, DRIVER)
    status_free = sum(int(r.cpus.free + r.isolated.free) for r in rows)
    daemon_free = len(allocatable_cpus(node.topology, node.config) - node.state.allocated_cpus)
    assert status_free == daemon_free, f"status counts {status_free} free CPUs, the daemon {daemon_free}"
    for number, device in enumerate(node.published):
        model: Device = node.index[device.name]
        if not model.cpus:
            continue
        key = next(iter(device.capacity), None)
        free = int(device.capacity[key].value - _held(device, usage, key)) if key else int(not usage.get(device.key))
        # With whole cores, a thread whose sibling is offline is a core of its own: an odd CPU may stay free.
        whole = free - free % model.step
        if whole:
            results, _, _ = node.schedule([(number, whole)])
            assert results, f"{device.name}: explain does not allow {whole} of the {free} CPUs status counts free"
            assert not _refused(node, node.claim(results)), f"{device.name}: prepare refuses {whole} free CPUs"
        over, _, _ = node.schedule([(number, free + model.step)]) if key else (None, [], False)
        assert over is None, f"{device.name}: explain allows more than the {free} CPUs status counts free"
