"""The NRI plugin against a scripted runtime on a unix socket: the protocol paths a real runtime seldom takes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf.message import Message

from dra_cpu.core.claims import ClaimRef
from dra_cpu.core.cpuset import CPUSet
from dra_cpu.core.state import PreparedClaim, PreparedDevice, State
from dra_cpu.errors import DraCpuError
from dra_cpu.node.sysfs import read_topology
from dra_cpu.nri.enforcer import NriConfig, NriEnforcer
from dra_cpu.nri.gen import nri_ttrpc_pb2
from dra_cpu.nri.gen import nri_v1alpha1_pb2 as api
from dra_cpu.nri.transport import FAILED_PRECONDITION, RUNTIME_CONN, TYPE_REQUEST, UNIMPLEMENTED
from tests.support.nri_peer import Runtime
from tests.support.paths import SYSFS

TOPOLOGY = read_topology(SYSFS / "kvm-2cpu")
POD = api.PodSandbox(id="sandbox-1", uid="pod-1", name="p", namespace="ns")
CLAIM = PreparedClaim(
    ClaimRef("ns", "c", "uid-1"), (PreparedDevice(("r",), "node", "cpu-numa0", cpus=CPUSet.parse("1")),), ("pod-1",)
)
M = TypeVar("M", bound=Message)


def container(cid: str, env: tuple[str, ...] = ()) -> api.Container:
    return api.Container(id=cid, pod_sandbox_id=POD.id, name=cid, env=env, state=api.CONTAINER_RUNNING)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[Runtime, NriEnforcer]]:
    fake = Runtime(tmp_path / "nri.sock")
    plugin = NriEnforcer(
        NriConfig(socket=tmp_path / "nri.sock", plugin_index="07", backoff_max=0.2), TOPOLOGY, State({"uid-1": CLAIM})
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


def test_events_for_containers_never_seen(runtime: tuple[Runtime, NriEnforcer]) -> None:
    fake, _plugin = runtime
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    stranger = container("stranger", ("DRA_CPUSET_uid-1=1",))
    assert fake.call("StopContainer", api.StopContainerRequest(pod=POD, container=stranger), api.StopContainerResponse)
    event = api.StateChangeEvent(event=api.REMOVE_CONTAINER, pod=POD, container=stranger)
    assert fake.call("StateChange", event, api.Empty) == api.Empty()
    update = fake.call(
        "UpdateContainer", api.UpdateContainerRequest(pod=POD, container=stranger), api.UpdateContainerResponse
    )
    assert isinstance(update, api.UpdateContainerResponse)
    assert [(u.container_id, cpus_of(u)) for u in update.update] == [("stranger", "1")]
    status = fake.call("Frobnicate", api.Empty(), api.Empty)
    assert getattr(status, "code", None) == UNIMPLEMENTED


def test_claims_changed_pushes_updates_from_the_plugins_own_thread(runtime: tuple[Runtime, NriEnforcer]) -> None:
    fake, plugin = runtime
    fake.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    created = fake.call(
        "CreateContainer",
        api.CreateContainerRequest(pod=POD, container=container("plain")),
        api.CreateContainerResponse,
    )
    assert isinstance(created, api.CreateContainerResponse)
    assert created.adjust.linux.resources.cpu.cpus == "0"

    plugin.claims_changed(State())
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
    plugin.claims_changed(State({"uid-1": whole}))
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
