"""Properties of the core that hold for every machine, device setting, claim stream and prepare/unprepare order
(tests/harness/strategies.py draws them): no CPU and no byte of hugepages or memory in two claims, nothing over a
device's capacity, the same inputs give the same grants, the checkpoint's encoding round-trips, and restore() turns
any state a damaged disk may hold (or a node whose memory shrank) into one that obeys the same invariants, dropping
whole claims only."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dra_cpu.core.claims import ClaimError, ClaimRef
from dra_cpu.core.devices import Device, DeviceType, allocatable_cpus, device_index
from dra_cpu.core.grant import grant
from dra_cpu.core.ledger import Ledger, PreparedClaim, Unrestorable, restore
from dra_cpu.core.memory import MEMORY_STEP
from dra_cpu.core.node_view import NodeSettings, NodeView
from dra_cpu.core.topology import Topology
from dra_cpu.store.checkpoint import Checkpoint, decode, encode
from tests.harness.strategies import Scenario, loose_claims, memory_capacities, scenarios, topologies


def bounded(examples: int) -> settings:
    """Bounded so that the file runs in about a minute on 2 cores; derandomized so that CI sees the same examples."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


Outcome = PreparedClaim | str | None


def _run(s: Scenario) -> tuple[Ledger, list[Outcome]]:
    """Feed the scenario's prepares and unprepares to grant(), checking the invariants after each step."""
    state, outcomes = Ledger(), list[Outcome]()
    index = device_index(s.devices)
    view = _view(s)
    for op, i in s.ops:
        request = s.claims[i]
        if op == "unprepare":
            state = state.without(request.ref.uid)
            outcomes.append(None)
        else:
            try:
                claim = grant(state, request, view)
            except ClaimError as err:
                outcomes.append(str(err))
            else:
                if request.ref.uid in state.claims:
                    assert claim == state.claims[request.ref.uid], "a repeated prepare gives the same grant"
                state = state.with_claim(claim)
                outcomes.append(claim)
        _check_invariants(state, s, index)
    return state, outcomes


def _view(s: Scenario) -> NodeView:
    return NodeView(s.topology, s.devices, NodeSettings(s.config))


def _memory_held(claims: Iterable[PreparedClaim]) -> dict[int, int]:
    held: dict[int, int] = {}
    for claim in claims:
        for m in claim.memory:
            held[m.numa_node] = held.get(m.numa_node, 0) + m.bytes
    return held


def _hugepages_held(claims: Iterable[PreparedClaim]) -> dict[tuple[int, int], int]:
    held: dict[tuple[int, int], int] = {}
    for claim in claims:
        for h in claim.hugepages:
            held[(h.numa_node, h.page_size_kib)] = held.get((h.numa_node, h.page_size_kib), 0) + h.bytes
    return held


def _check_disjoint(claims: Iterable[PreparedClaim]) -> None:
    seen: set[int] = set()
    for claim in claims:
        assert seen.isdisjoint(claim.cpus.ids), f"CPU(s) {seen & claim.cpus.ids} in two claims"
        seen |= claim.cpus.ids


def _check_invariants(state: Ledger, s: Scenario, index: Mapping[str, Device]) -> None:
    claims = list(state.claims.values())
    _check_disjoint(claims)
    allocatable = allocatable_cpus(s.topology, s.config)
    for claim in claims:
        assert not claim.cpus - allocatable, f"claim {claim.uid} holds {claim.cpus - allocatable}, not allocatable"
        for d in claim.devices:
            device = index[d.device]
            assert not d.cpus - device.cpus, f"{d.cpus} outside device {device.name} ({device.cpus})"
            if d.hugepages is not None:
                assert (d.hugepages.numa_node, d.hugepages.page_size_kib) == (device.numa_node, device.page_size_kib)
                assert d.hugepages.bytes % device.step == 0
            if d.memory is not None:
                assert device.type is DeviceType.MEMORY and d.memory.numa_node == device.numa_node
                assert d.memory.bytes > 0 and d.memory.bytes % MEMORY_STEP == 0
    capacity = {(d.numa_node, d.page_size_kib): d.capacity for d in index.values() if d.type is DeviceType.HUGEPAGES}
    for key, held in _hugepages_held(claims).items():
        assert held <= capacity[key], f"hugepages {key}: {held} bytes granted of {capacity[key]}"
    memory = {d.numa_node: d.capacity for d in index.values() if d.type is DeviceType.MEMORY}
    for node, held in _memory_held(claims).items():
        assert held <= memory[node], f"memory of NUMA node {node}: {held} bytes granted of {memory[node]}"
    if state.allocated_cpus - s.topology.isolated_cpus:
        floor = s.config.shared_floor
        assert len(floor.pool(s.topology, state.allocated_cpus)) >= floor.minimum
    # What enters the process from disk is the same state again.
    assert restore(claims, s.topology, _view(s).memory_capacity) == Ledger(state.claims)


@bounded(2000)
@given(scenarios())
def test_claim_streams_keep_every_invariant_and_are_deterministic(s: Scenario) -> None:
    state, outcomes = _run(s)
    again, outcomes_again = _run(copy.deepcopy(s))
    assert (again, outcomes_again) == (state, outcomes), "the same inputs gave different grants"


@bounded(800)
@given(scenarios(), st.text("abc-", max_size=12), st.sampled_from(["", "its CPU(s) 9 are not online"]))
def test_checkpoint_round_trip(s: Scenario, boot_id: str, reason: str) -> None:
    state, _ = _run(s)
    lost = {"gone": Unrestorable(ClaimRef("ns", "gone", "gone"), reason)} if reason else {}
    checkpoint = Checkpoint(Ledger(state.claims, lost), boot_id)
    assert decode(encode(checkpoint), "x") == checkpoint
    # The per-claim cache of the encoder gives the same bytes as a fresh encoding.
    cache: dict[str, tuple[PreparedClaim, str]] = {}
    encode(Checkpoint(Ledger(dict(list(state.claims.items())[:1])), boot_id), cache)
    assert encode(checkpoint, cache) == encode(checkpoint)


Disk = tuple[Topology, dict[int, int], list[PreparedClaim]]


@st.composite
def damaged_disks(draw: st.DrawFn) -> Disk:
    """A machine, the memory its devices publish (some reservation: a node's memory may have shrunk since), and
    claims as a damaged disk may hold them."""
    topology = draw(topologies())
    return topology, draw(memory_capacities(topology)), draw(loose_claims(topology))


@bounded(4000)
@given(damaged_disks())
def test_restore_repairs_any_state_by_dropping_whole_claims(case: Disk) -> None:
    topology, memory, claims = case
    state = restore(claims, topology, memory)
    assert set(state.claims) | set(state.unrestorable) == {c.uid for c in claims}
    assert not set(state.claims) & set(state.unrestorable)
    kept = list(state.claims.values())
    assert all(c in claims for c in kept), "kept claims are kept whole and unchanged"
    _check_disjoint(kept)
    assert not state.allocated_cpus - topology.online_cpus
    pools = {(n.id, p.size_kib): p.total * p.size_bytes for n in topology.numa_nodes for p in n.hugepages}
    for key, held in _hugepages_held(kept).items():
        assert held <= pools.get(key, 0)
    for node, held in _memory_held(kept).items():
        assert held <= memory.get(node, 0)
    # The first claim is dropped only for what it holds itself, never for a conflict.
    if claims and claims[0].uid in state.unrestorable:
        assert "also held by" not in state.unrestorable[claims[0].uid].reason
    assert restore(claims, topology, memory) == state
    assert restore(kept, topology, memory) == Ledger(state.claims)
