"""The device-health stream: every published device, healthy while its CPUs are online."""

from __future__ import annotations

import dataclasses
import time

import grpc
import pytest

from dra_cpu.core.devices import build_devices
from dra_cpu.kubelet.gen import dra_health_v1alpha1_pb2 as pb
from dra_cpu.kubelet.gen import dra_health_v1alpha1_pb2_grpc
from tests.support.kubelet_node import Node, NodeFactory, result
from tests.support.waiting import eventually


def _health(node: Node) -> dict[str, tuple[int, str]]:
    stream = node.kubelet.watch_health(timeout=5)
    first = next(stream)
    stream.cancel()
    assert {d.device.pool_name for d in first.devices} == {"node-a"}
    return {d.device.device_name: (d.health, d.message) for d in first.devices}


def test_devices_turn_unhealthy_when_their_cpus_go_offline(node_factory: NodeFactory) -> None:
    node = node_factory()
    ref = node.claim([result("cpu-numa1", cpus=2)])
    cpus = node.cpus_of(ref)
    health = _health(node)
    assert set(health) == {"cpu-numa0", "cpu-numa1", "hugepages-2mi-numa0", "hugepages-2mi-numa1"}
    assert all(h == pb.HEALTHY for h, _ in health.values())

    # Offline every CPU of NUMA node 1, as a hotplug event followed by re-discovery would.
    topo = node.driver.topology
    offline = tuple(dataclasses.replace(c, online=False) if c.numa_node == 1 else c for c in topo.cpus)
    changed = dataclasses.replace(topo, cpus=offline)
    node.driver.set_topology(changed, build_devices(changed, node.driver.config))
    health = _health(node)
    assert health["cpu-numa0"] == (pb.HEALTHY, "")
    state, message = health["cpu-numa1"]
    assert state == pb.UNHEALTHY and str(cpus) in message


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
            stub = dra_health_v1alpha1_pb2_grpc.DRAResourceHealthStub(channels[i % len(channels)])
            streams.append(stub.NodeWatchResources(pb.NodeWatchResourcesRequest(), timeout=30))
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
        eventually(lambda: node.plugin.health.open_streams == 0, "the workers of cancelled streams are given back")
    finally:
        for channel in channels:
            channel.close()
