"""The NRI plugin against a scripted runtime on a unix socket: the protocol paths a real runtime seldom takes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf.message import Message

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.entitlement import MemoryPolicy, Pin, pools
from dra_cpu.core.ledger import HugePageGrant, Ledger, MemoryGrant, PreparedClaim, PreparedDevice
from dra_cpu.core.memory import MemoryBinding
from dra_cpu.core.sharing import not_held
from dra_cpu.errors import DraCpuError
from dra_cpu.node.sysfs import read_topology
from dra_cpu.nri import messages
from dra_cpu.nri.enforcer import NriConfig, NriEnforcer, major_minor
from dra_cpu.nri.gen import nri_ttrpc_pb2
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.transport import FAILED_PRECONDITION, RUNTIME_CONN, TYPE_REQUEST, UNIMPLEMENTED
from tests.harness.paths import SYSFS
from tests.harness.runtimes.nri_peer import Runtime

TOPOLOGY = read_topology(SYSFS / "kvm-2cpu")
POD = api.PodSandbox(id="sandbox-1", uid="pod-1", name="p", namespace="ns")
CLAIM = PreparedClaim(
    ClaimRef("ns", "c", "uid-1"), (PreparedDevice(("r",), "node", "cpu-numa0", cpus=CPUSet.parse("1")),), ("pod-1",)
)
POD_M = api.PodSandbox(id="sandbox-m", uid="pod-m", name="m", namespace="ns")
# Memory only: its containers run on the shared CPUs, their memory bound.
WITH_MEMORY = PreparedClaim(
    ClaimRef("ns", "m", "uid-m"),
    (PreparedDevice(("m",), "node", "memory-numa0", memory=MemoryGrant(0, 64 << 20)),),
    ("pod-m",),
)
M = TypeVar("M", bound=Message)
DELIVERY = pytest.mark.parametrize("own_rpc", [True, False], ids=["own-rpc", "state-change"])
"""StartContainer and RemoveContainer as NRI 0.12 runtimes call them, and as older ones send them (StateChange)."""


def container(cid: str, env: tuple[str, ...] = ()) -> api.Container:
    return api.Container(id=cid, pod_sandbox_id=POD.id, name=cid, env=env, state=api.CONTAINER_RUNNING)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[Runtime, NriEnforcer]]:
    fake = Runtime(tmp_path / "nri.sock")
    plugin = NriEnforcer(
        NriConfig(socket=tmp_path / "nri.sock", plugin_index="07", backoff_max=0.2),
        pools(Ledger({"uid-1": CLAIM}), TOPOLOGY),
    )
    plugin.start()
    fake.accept()
    yield fake, plugin
    plugin.stop()
    fake.listener.close()


def cpus_of(update: api.ContainerUpdate) -> str:
    return update.linux.resources.cpu.cpus


def test_synchronize_in_chunks_reconciles_every_container(runtime: tuple[Runtime, NriEnforcer]) -> None:
    fake, plugin = runtime
    with pytest.raises(DraCpuError, match="not enforced"):
        plugin.check_ready()
    first = fake.call(
        "Synchronize",
        api.SynchronizeRequest(pods=[POD], containers=[container("a")], more=True),
        api.SynchronizeResponse,
    )
    assert first == api.SynchronizeResponse(more=True) and not plugin.ready.is_set()
    final = fake.call(
        "Synchronize",
        api.SynchronizeRequest(containers=[container("b", ("DRA_CPUSET_uid-1=1",))]),
        api.SynchronizeResponse,
    )
    assert isinstance(final, api.SynchronizeResponse)
    assert {u.container_id: cpus_of(u) for u in final.update} == {"a": "0", "b": "1"}
    assert plugin.ready.is_set()
    plugin.check_ready()


@DELIVERY
def test_events_for_containers_never_seen(
    runtime: tuple[Runtime, NriEnforcer], own_rpc: bool, caplog: pytest.LogCaptureFixture
) -> None:
    fake, _plugin = runtime
    caplog.set_level(logging.INFO, logger="dra_cpu.nri")
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    stranger = container("stranger", ("DRA_CPUSET_uid-1=1",))
    assert fake.call("StopContainer", api.StopContainerRequest(pod=POD, container=stranger), api.StopContainerResponse)
    fake.container_event(api.START_CONTAINER, POD, stranger, own_rpc)
    fake.container_event(api.REMOVE_CONTAINER, POD, stranger, own_rpc)
    assert [getattr(r, "containerID", None) for r in caplog.records if "never seen" in r.getMessage()] == ["stranger"]
    update = fake.call(
        "UpdateContainer", api.UpdateContainerRequest(pod=POD, container=stranger), api.UpdateContainerResponse
    )
    assert isinstance(update, api.UpdateContainerResponse)
    assert [(u.container_id, cpus_of(u)) for u in update.update] == [("stranger", "1")]
    status = fake.call("Frobnicate", api.Empty(), api.Empty)
    assert getattr(status, "code", None) == UNIMPLEMENTED


@DELIVERY
def test_start_and_remove_reach_the_container_table_by_either_delivery(
    runtime: tuple[Runtime, NriEnforcer], own_rpc: bool
) -> None:
    fake, plugin = runtime
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    for cid in ("kept", "gone"):
        fake.call(
            "CreateContainer",
            api.CreateContainerRequest(pod=POD, container=container(cid)),
            api.CreateContainerResponse,
        )
        fake.container_event(api.START_CONTAINER, POD, container(cid), own_rpc)
    # No StopContainer first, so that only the removal can take "gone" out of the table: once it has, only "kept"
    # follows the shared pool when it grows.
    fake.container_event(api.REMOVE_CONTAINER, POD, container("gone"), own_rpc)
    plugin.set_pools(pools(Ledger(), TOPOLOGY))
    assert fake.peer is not None
    call = fake.peer.read()
    request = api.UpdateContainersRequest.FromString(nri_ttrpc_pb2.Request.FromString(call.payload).payload)
    assert [(u.container_id, cpus_of(u)) for u in request.update] == [("kept", "0-1")]
    fake.peer.respond(call.stream, api.UpdateContainersResponse().SerializeToString())
    delivered = {
        m: n for m, n in plugin.stub.calls.items() if m in ("StartContainer", "RemoveContainer", "StateChange")
    }
    assert delivered == ({"StartContainer": 2, "RemoveContainer": 1} if own_rpc else {"StateChange": 3})


def test_registration_names_the_nri_api_the_plugin_speaks(runtime: tuple[Runtime, NriEnforcer]) -> None:
    fake, _plugin = runtime
    assert (fake.registered.plugin_name, fake.registered.NRI_version) == ("dra-cpu", "v0.12.3")


def test_changed_pools_push_updates_from_the_plugins_own_thread(runtime: tuple[Runtime, NriEnforcer]) -> None:
    fake, plugin = runtime
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    created = fake.call(
        "CreateContainer",
        api.CreateContainerRequest(pod=POD, container=container("plain")),
        api.CreateContainerResponse,
    )
    assert isinstance(created, api.CreateContainerResponse)
    assert created.adjust.linux.resources.cpu.cpus == "0"

    plugin.set_pools(pools(Ledger(), TOPOLOGY))
    assert fake.peer is not None
    call = fake.peer.read()
    assert (call.conn, call.type) == (RUNTIME_CONN, TYPE_REQUEST)
    request = api.UpdateContainersRequest.FromString(nri_ttrpc_pb2.Request.FromString(call.payload).payload)
    assert [(u.container_id, cpus_of(u)) for u in request.update] == [("plain", "0-1")]
    fake.peer.respond(call.stream, api.UpdateContainersResponse().SerializeToString())
    assert plugin.shared_cpus == CPUSet.parse("0-1")


def test_empty_shared_pool_refuses_unclaimed_containers(runtime: tuple[Runtime, NriEnforcer]) -> None:
    fake, plugin = runtime
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    whole = PreparedClaim(CLAIM.ref, (PreparedDevice(("r",), "n", "d", cpus=CPUSet.parse("0-1")),), ("pod-1",))
    plugin.set_pools(pools(Ledger({"uid-1": whole}), TOPOLOGY))
    refused = fake.call(
        "CreateContainer", api.CreateContainerRequest(pod=POD, container=container("x")), api.CreateContainerResponse
    )
    assert getattr(refused, "code", None) == FAILED_PRECONDITION
    assert "no shared CPU" in getattr(refused, "message", "")


def test_runtime_going_away_clears_ready_and_the_plugin_comes_back(runtime: tuple[Runtime, NriEnforcer]) -> None:
    fake, plugin = runtime
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    assert fake.peer is not None
    fake.peer.sock.close()
    fake.accept()
    assert not plugin.ready.is_set()
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    assert plugin.ready.is_set() and plugin.counters.connects == 2


def test_bad_config_is_refused_with_its_value() -> None:
    with pytest.raises(DraCpuError, match="'7'"):
        NriConfig(plugin_index="7")


HUGE = PreparedClaim(
    ClaimRef("ns", "huge", "uid-h"),
    (
        PreparedDevice(("cpus",), "node", "cpu-numa0", cpus=CPUSet.parse("1")),
        PreparedDevice(("mem",), "node", "hugepages-2mi-numa0", hugepages=HugePageGrant(0, 2048, 4 << 20)),
    ),
    ("pod-1",),
)
CGROUP = "/kubepods/pod-1/huge-container"


def fake_hugetlb_tree(root: Path, version: int, rsvd: bool = True) -> Path:
    """A cgroup root with the container's hugetlb files as the kernel shows them before any limit is set."""
    if version == 2:
        base, suffix, unlimited = root, "max", "max"
        root.mkdir(parents=True, exist_ok=True)
        (root / "cgroup.controllers").write_text("cpuset cpu memory hugetlb pids\n")
    else:
        base, suffix, unlimited = root / "hugetlb", "limit_in_bytes", str(2**63 - 1)
        base.mkdir(parents=True)
        (base / "cgroup.procs").write_text("")
    directory = base / CGROUP.lstrip("/")
    directory.mkdir(parents=True)
    for name in [f"hugetlb.2MB.{suffix}", *([f"hugetlb.2MB.rsvd.{suffix}"] if rsvd else [])]:
        (directory / name).write_text(f"{unlimited}\n")
    return directory


def _connected(tmp_path: Path, state: Ledger, nri_version: str) -> tuple[Runtime, NriEnforcer]:
    fake = Runtime(tmp_path / "nri.sock")
    config = NriConfig(socket=tmp_path / "nri.sock", plugin_index="07", backoff_max=0.2, cgroup_root=tmp_path / "cg")
    plugin = NriEnforcer(config, pools(state, TOPOLOGY))
    plugin.start()
    fake.accept(nri_version)
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    return fake, plugin


def _create(fake: Runtime, cid: str, env: tuple[str, ...], pod: api.PodSandbox = POD) -> api.CreateContainerResponse:
    request = api.CreateContainerRequest(pod=pod, container=container(cid, env))
    request.container.linux.cgroups_path = CGROUP
    created = fake.call("CreateContainer", request, api.CreateContainerResponse)
    assert isinstance(created, api.CreateContainerResponse), created
    return created


def _start(fake: Runtime, cid: str, own_rpc: bool = True) -> None:
    started = container(cid)
    started.linux.cgroups_path = CGROUP
    fake.container_event(api.START_CONTAINER, POD, started, own_rpc)


@DELIVERY
@pytest.mark.parametrize(("version", "suffix"), [(2, "max"), (1, "limit_in_bytes")])
def test_hugepage_claim_limits_land_in_both_hugetlb_files(
    tmp_path: Path, version: int, suffix: str, own_rpc: bool
) -> None:
    directory = fake_hugetlb_tree(tmp_path / "cg", version)
    fake, plugin = _connected(tmp_path, Ledger({"uid-h": HUGE}), "v0.12.0")
    try:
        created = _create(fake, "huge", ("DRA_CPUSET_uid-h=1",))
        # What the runtime gets: OCI hugepageLimits (runc >= 1.1.10 writes both files from it) and cpuset.mems ...
        resources = created.adjust.linux.resources
        assert [(h.page_size, h.limit) for h in resources.hugepage_limits] == [("2MB", 4 << 20)]
        assert (resources.cpu.cpus, resources.cpu.mems) == ("1", "0")
        # ... and, after creation, what the enforcer makes sure of itself: the fault and the reservation limit.
        _start(fake, "huge", own_rpc)
        assert (directory / f"hugetlb.2MB.{suffix}").read_text() == str(4 << 20)
        assert (directory / f"hugetlb.2MB.rsvd.{suffix}").read_text() == str(4 << 20)
        assert plugin.counters.hugetlb_unenforced == 0
    finally:
        plugin.stop()


def test_hugetlb_without_reservation_files_or_controller_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = fake_hugetlb_tree(tmp_path / "cg", 2, rsvd=False)
    fake, plugin = _connected(tmp_path, Ledger({"uid-h": HUGE}), "")
    try:
        _create(fake, "huge", ("DRA_CPUSET_uid-h=1",))
        _start(fake, "huge")
        assert (directory / "hugetlb.2MB.max").read_text() == str(4 << 20)
        assert "no hugetlb reservation limit" in caplog.text
        (directory / "hugetlb.2MB.max").unlink()
        _start(fake, "huge")
        assert plugin.counters.hugetlb_unenforced == 1
        reasons = [str(getattr(r, "reason", "")) for r in caplog.records]
        assert any("the hugetlb controller is not enabled for the container's cgroup" in r for r in reasons)
    finally:
        plugin.stop()


def test_memory_policy_of_claimed_containers_where_the_runtime_has_nri_0_12(tmp_path: Path) -> None:
    """A claim with memory: MPOL_BIND to its nodes. A claim of CPUs only: a preference for theirs. Containers without
    a claim: the kernel's default, untouched."""
    fake, plugin = _connected(tmp_path, Ledger({"uid-1": CLAIM, "uid-m": WITH_MEMORY}), "v0.12.2")
    try:
        assert plugin.memory_policy
        policy = _create(fake, "pinned", ("DRA_CPUSET_uid-1=1",)).adjust.linux.memory_policy
        assert (policy.mode, policy.nodes) == (api.MPOL_PREFERRED, "0")
        bound = _create(fake, "bound", ("DRA_CPUSET_uid-m=",), POD_M).adjust.linux
        assert (bound.memory_policy.mode, bound.memory_policy.nodes, bound.resources.cpu.mems) == (
            api.MPOL_BIND,
            "0",
            "0",
        )
        assert not _create(fake, "plain", ()).adjust.linux.HasField("memory_policy")
    finally:
        plugin.stop()


@pytest.mark.parametrize("version", ["", "v0.9.0", "0.11.3"])
def test_older_runtimes_get_no_memory_policy_and_it_is_said_once(
    tmp_path: Path, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake, plugin = _connected(tmp_path, Ledger({"uid-1": CLAIM}), version)
    try:
        assert not plugin.memory_policy
        adjust = _create(fake, "pinned", ("DRA_CPUSET_uid-1=1",)).adjust
        assert not adjust.linux.HasField("memory_policy") and adjust.linux.resources.cpu.mems == "0"
        assert fake.peer is not None
        fake.peer.sock.close()
        fake.accept(version)
        fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
        assert caplog.text.count("cannot set a memory policy") == 1
    finally:
        plugin.stop()


def test_a_container_of_another_pod_using_the_claim_is_refused_naming_claim_and_pod(
    runtime: tuple[Runtime, NriEnforcer],
) -> None:
    fake, plugin = runtime
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    second = api.PodSandbox(id="sandbox-2", uid="pod-2", name="second", namespace="ns")
    request = api.CreateContainerRequest(pod=second, container=container("app", ("DRA_CPUSET_uid-1=1",)))
    refused = fake.call("CreateContainer", request, api.CreateContainerResponse)
    assert getattr(refused, "code", None) == FAILED_PRECONDITION
    assert getattr(refused, "message", "") == not_held(CLAIM.ref, ("pod-1",), "app", "ns/second", "pod-2")
    assert (plugin.counters.shared_claim_refused, plugin.counters.forged_env) == (1, 0)
    # Hand-over is told which pod waits for which claim, and what it knows of why that pod cannot hold it is added.
    told: list[tuple[str, str]] = []

    def waiting(claim: str, pod: str) -> str:
        told.append((claim, pod))
        return "its CPU limit is too low"

    plugin.waiting = waiting
    again = fake.call("CreateContainer", request, api.CreateContainerResponse)
    assert told == [("uid-1", "pod-2")]
    assert getattr(again, "message", "") == (
        not_held(CLAIM.ref, ("pod-1",), "app", "ns/second", "pod-2") + "; this pod cannot hold it: its CPU limit is "
        "too low"
    )
    plugin.waiting = None
    # An env that matches no prepared claim is still a forgery: shared pool, counted.
    forged = fake.call(
        "CreateContainer",
        api.CreateContainerRequest(pod=second, container=container("forged", ("DRA_CPUSET_uid-1=0",))),
        api.CreateContainerResponse,
    )
    assert isinstance(forged, api.CreateContainerResponse) and forged.adjust.linux.resources.cpu.cpus == "0"
    assert plugin.counters.forged_env == 1
    # Two containers of the claim's own pod share its CPUs.
    for name in ("app", "sidecar"):
        mine = fake.call(
            "CreateContainer",
            api.CreateContainerRequest(pod=POD, container=container(name, ("DRA_CPUSET_uid-1=1",))),
            api.CreateContainerResponse,
        )
        assert isinstance(mine, api.CreateContainerResponse) and mine.adjust.linux.resources.cpu.cpus == "1"


@pytest.mark.parametrize(
    ("binding", "nodes", "preferred_many", "mode"),
    [
        (MemoryBinding.STRICT, "0-1", True, api.MPOL_BIND),
        (MemoryBinding.PREFERRED, "1", True, api.MPOL_PREFERRED),
        (MemoryBinding.PREFERRED, "1", False, api.MPOL_PREFERRED),
        (MemoryBinding.PREFERRED, "0-1", True, api.MPOL_PREFERRED_MANY),
        # Linux before 5.15 refuses MPOL_PREFERRED_MANY, and the container with it: the kernel's local allocation
        # (the pinned CPUs' nodes first) stands in.
        (MemoryBinding.PREFERRED, "0-1", False, None),
    ],
)
def test_memory_policy_modes(
    binding: MemoryBinding, nodes: str, preferred_many: bool, mode: api.MpolMode.ValueType | None
) -> None:
    pin = Pin(
        CPUSet.parse("2"), CPUSet.parse("0-1"), claims=("c",), memory_policy=MemoryPolicy(binding, CPUSet.parse(nodes))
    )
    linux = messages.adjustment(pin, True, preferred_many).linux
    if mode is None:
        assert not linux.HasField("memory_policy")
    else:
        assert (linux.memory_policy.mode, linux.memory_policy.nodes) == (mode, nodes)
    assert not messages.adjustment(pin, False, preferred_many).linux.HasField("memory_policy")


@pytest.mark.parametrize(
    ("release", "version"),
    [("6.1.0-18-amd64", (6, 1)), ("5.15.0-91-generic", (5, 15)), ("v0.12.1", (0, 12)), ("", None)],
)
def test_major_minor_of_kernels_and_nri(release: str, version: tuple[int, int] | None) -> None:
    assert major_minor(release) == version
