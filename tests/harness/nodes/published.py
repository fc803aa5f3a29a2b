"""A node without a kubelet: a Node object made as a kubelet registers one, sized like a machine of
tests/fixtures/sysfs, and the driver's ResourceSlices for it published the way the daemon publishes them. The
scheduler allocates claims from it and binds pods to it; nothing runs them. Made in well under a second, so a test
makes as many as it needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client

from dra_cpu.core.devices import DeviceConfig, build_devices
from dra_cpu.core.topology import Topology
from dra_cpu.kube.apiserver import connect
from dra_cpu.kube.publisher import SlicePublisher
from dra_cpu.node.sysfs import read_topology
from tests.harness.cluster.client import Kube, close_api_client
from tests.harness.cluster.objects import create_node

LOG = logging.getLogger("test.cluster")


@dataclass(frozen=True)
class PublishedNode:
    name: str
    topology: Topology
    config: DeviceConfig
    slices: tuple[dict[str, Any], ...]  # as read back from the server after publishing


def node_resources(topology: Topology) -> tuple[int, int, dict[str, int]]:
    """(CPUs, memory bytes, hugepages bytes by page size) a kubelet on this topology would report."""
    hugepages: dict[str, int] = {}
    for node in topology.numa_nodes:
        for pool in node.hugepages:
            if pool.total:
                hugepages[pool.quantity] = hugepages.get(pool.quantity, 0) + pool.total * pool.size_kib * 1024
    return len(topology.online_cpus), sum(n.memory_bytes for n in topology.numa_nodes), hugepages


def publish_node(
    kubeconfig: Path, api: client.ApiClient, name: str, sysfs_root: Path, config: DeviceConfig | None = None
) -> PublishedNode:
    """A Ready Node sized like the machine at `sysfs_root`, and the driver's ResourceSlices for it, published the way
    the daemon publishes them (SlicePublisher, connected with `kubeconfig`)."""
    config = config or DeviceConfig(node_name=name)
    topology = read_topology(sysfs_root, pcie_roots=config.pcie_roots)
    cpus, memory, hugepages = node_resources(topology)
    create_node(api, name, cpus=cpus, memory=memory, hugepages=hugepages)
    kube = connect(str(kubeconfig))
    try:
        publisher = SlicePublisher(kube, config, LOG)
        publisher.set_devices(build_devices(topology, config))
        publisher.sync_once()
        if publisher.errors or publisher.dropped_field_warnings:
            raise AssertionError(f"publishing the slices of {name}: {publisher.errors} errors, fields dropped")
    finally:
        close_api_client(kube.api_client)
    slices = Kube(api).list(
        "/apis/resource.k8s.io/v1/resourceslices",
        field_selector=f"spec.nodeName={name},spec.driver={config.driver_name}",
    )
    return PublishedNode(name, topology, config, tuple(sorted(slices, key=lambda s: str(s["metadata"]["name"]))))
