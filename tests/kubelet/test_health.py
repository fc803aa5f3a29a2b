"""The device-health stream: every published device, healthy while its CPUs are online."""

from __future__ import annotations

import dataclasses

from dra_cpu.core.devices import build_devices
from dra_cpu.kubelet.gen import dra_health_v1alpha1_pb2 as pb
from tests.support.kubelet_node import Node, NodeFactory, result


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
