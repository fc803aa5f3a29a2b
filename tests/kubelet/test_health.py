"""The device-health stream, v1 and v1alpha1: every device ever published, Unhealthy with the reason when its CPUs
or its NUMA node's memory went away, Unknown while discovery fails."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from dra_cpu.core.cpuset import CPUSet
from dra_cpu.kubelet.gen import dra_health_v1_pb2 as pb
from dra_cpu.kubelet.gen import dra_health_v1_pb2_grpc, dra_health_v1alpha1_pb2, dra_health_v1alpha1_pb2_grpc
from dra_cpu.kubelet.health import bounded_message
from tests.harness.claims import result
from tests.harness.nodes.standin import NodeFactory, StandinNode, offline_cpus, remove_memory
from tests.harness.poll import wait_until


def _stream(node: StandinNode, service: str | None = None) -> list[tuple[str, str, int, str, int]]:
    """The first response of a fresh stream: (pool, device, health, message, timeout) per device."""
    stream = node.kubelet.watch_health(timeout=5, service=service)
    first = next(stream)
    stream.cancel()
    return [
        (d.device.pool_name, d.device.device_name, d.health, d.message, d.health_check_timeout_seconds)
        for d in first.devices
    ]


def _health(node: StandinNode, service: str | None = None) -> dict[str, tuple[int, str]]:
    devices = _stream(node, service)
    assert {pool for pool, *_ in devices} == {"node-a"}
    return {name: (health, message) for _, name, health, message, _ in devices}


def test_getinfo_lists_both_health_versions_and_the_kubelet_takes_v1(node_factory: NodeFactory) -> None:
    node = node_factory()
    assert list(node.kubelet.info.supported_versions) == [
        "v1.DRAPlugin",
        "v1beta1.DRAPlugin",
        "v1.DRAResourceHealth",
        "v1alpha1.DRAResourceHealth",
    ]
    # As the 1.37 kubelet picks: the newest health service it knows that the plugin advertises.
    assert node.kubelet.health_service == "v1.DRAResourceHealth"


def test_v1_and_v1alpha1_streams_report_the_same_devices_and_states(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa1", cpus=2)])
    held = node.cpus_of(ref)
    node.rediscover(offline_cpus(held))
    v1 = _stream(node, "v1.DRAResourceHealth")
    v1alpha1 = _stream(node, "v1alpha1.DRAResourceHealth")
    assert v1 == v1alpha1
    assert [name for _, name, *_ in v1] == [
        f"{kind}-numa{n}" for kind in ("cpu", "hugepages-2mi", "memory") for n in (0, 1)
    ]
    assert {health for _, _, health, _, _ in v1} == {pb.HEALTHY, pb.UNHEALTHY}
    # Two resends of 10 s: one late resend does not turn devices Unknown; a wedged driver does within 20 s.
    assert {timeout for *_, timeout in v1} == {20}


def test_offline_cpus_make_their_device_unhealthy_with_a_message(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa1", cpus=2)])
    cpus = node.cpus_of(ref)
    health = _health(node)
    assert all(h == (pb.HEALTHY, "") for h in health.values())

    # One CPU the claim holds, one it does not: both are the device's.
    other = (CPUSet.parse("8-15") - cpus).first()
    node.rediscover(offline_cpus(CPUSet.of([cpus.first(), other])))
    health = _health(node)
    assert health["cpu-numa0"] == (pb.HEALTHY, "")
    state, message = health["cpu-numa1"]
    assert state == pb.UNHEALTHY
    assert message == (
        f"CPUs {CPUSet.of([cpus.first(), other])} are offline (prepared claims hold {CPUSet.of([cpus.first()])})"
    )

    # Every CPU of node 1 offline: the device is no longer published, and still reported, with why.
    node.rediscover(offline_cpus(CPUSet.parse("8-15")))
    assert "cpu-numa1" not in {d.name for d in node.driver.snapshot().view.devices}
    state, message = _health(node)["cpu-numa1"]
    assert state == pb.UNHEALTHY
    assert message.startswith("CPUs 8-15 are offline") and "NUMA node 1 has no online CPU any more" in message


def test_a_numa_node_that_loses_its_memory_makes_its_devices_unhealthy(node_factory: NodeFactory) -> None:
    node = node_factory("cxl-memoryless")
    before = _health(node)
    assert all(h == (pb.HEALTHY, "") for h in before.values())
    node.rediscover(remove_memory(0))
    health = _health(node)
    lost = {name for name, (state, _) in health.items() if state == pb.UNHEALTHY}
    assert lost == {name for name in before if name.endswith("numa0")}
    for name in lost:
        assert "NUMA node 0 has no memory any more (MemTotal 0)" in health[name][1]


def test_failing_discovery_makes_every_device_unknown(node_factory: NodeFactory) -> None:
    node = node_factory()
    node.plugin.health.discovery_failed("sysfs: cpu/online is not a CPU list")
    health = _health(node)
    assert {state for state, _ in health.values()} == {pb.UNKNOWN}
    assert all("cpu/online is not a CPU list" in message for _, message in health.values())
    node.plugin.health.discovery_ok()
    assert {state for state, _ in _health(node).values()} == {pb.HEALTHY}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("short", "short"),
        ("x" * 1024, "x" * 1024),
        ("x" * 1025, "x" * 1021 + "..."),
        # 1024 bytes is the kubelet's limit: a 3-byte character that would straddle byte 1021 is left out whole.
        ("x" * 1020 + "\u20ac" * 2, "x" * 1020 + "..."),
    ],
)
def test_messages_fit_the_kubelets_1024_bytes(message: str, expected: str) -> None:
    assert bounded_message(message) == expected
    assert len(bounded_message(message).encode()) <= 1024


def test_open_health_streams_never_starve_prepare(node_factory: NodeFactory) -> None:
    """A kubelet that reconnects again and again (or any client) leaves health streams open: however many, prepares
    and unprepares still get a worker, the newest streams are served and the oldest are told why they ended."""
    node = node_factory()
    ref = node.claim([result("cpu-numa0", cpus=2)])
    channels = [grpc.insecure_channel(f"unix://{node.plugin.paths.dra_socket}") for _ in range(4)]
    streams = []
    started = time.monotonic()
    try:
        for i in range(3 * node.plugin.workers):
            # Both versions, alternately: they share one budget of streams.
            channel = channels[i % len(channels)]
            if i % 2:
                stub: Any = dra_health_v1alpha1_pb2_grpc.DRAResourceHealthStub(channel)
                request: Any = dra_health_v1alpha1_pb2.NodeWatchResourcesRequest()
            else:
                stub, request = dra_health_v1_pb2_grpc.DRAResourceHealthStub(channel), pb.NodeWatchResourcesRequest()
            streams.append(stub.NodeWatchResources(request, timeout=30))
            # Each stream reaches the plugin before the next opens, as a reconnecting kubelet's would.
            assert next(streams[-1]).devices
        response = node.kubelet.prepare([ref], timeout=10).claims[ref.uid]
        assert response.error == "" and response.devices
        assert node.kubelet.unprepare([ref], timeout=10).claims[ref.uid].error == ""
        # Well inside the streams' own deadline: no stream had to time out to free a worker.
        assert time.monotonic() - started < 20
        newest = streams[-node.plugin.health.max_streams :]
        for stream in streams[: -node.plugin.health.max_streams]:
            with pytest.raises(grpc.RpcError) as ended:
                list(stream)
            assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "newer health stream" in (ended.value.details() or "")
        for stream in newest:
            stream.cancel()
        wait_until(lambda: node.plugin.health.open_streams == 0, "the workers of cancelled streams are given back")
    finally:
        for channel in channels:
            channel.close()
